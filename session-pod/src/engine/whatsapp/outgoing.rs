//! Outgoing messages as WhatsApp protobufs, built from a validated send and (for media) the
//! result of the upload. Pure: no I/O, unit-tested below.

use wa_api::pod::{Media, MessageKind};
use wa_rs::download::MediaType;
use wa_rs::upload::UploadResponse;
use wa_rs::wa_rs_proto::whatsapp as wa;
use wa_rs::wa_rs_proto::whatsapp::message::{AudioMessage, DocumentMessage, ExtendedTextMessage, ImageMessage, VideoMessage};

/// The media kind wa-rs encrypts and uploads under (it picks the key derivation).
pub fn media_type(kind: MessageKind) -> MediaType {
    match kind {
        MessageKind::Image => MediaType::Image,
        MessageKind::Video => MediaType::Video,
        MessageKind::Audio => MediaType::Audio,
        MessageKind::Document | MessageKind::Text => MediaType::Document,
    }
}

/// Quote context: only the quoted id is known here, which is what WhatsApp matches on.
fn reply_context(reply_to: Option<&str>) -> Option<Box<wa::ContextInfo>> {
    reply_to.map(|id| {
        Box::new(wa::ContextInfo {
            stanza_id: Some(id.to_owned()),
            ..Default::default()
        })
    })
}

/// A text message: a plain `conversation`, or an extended text when it quotes another one.
pub fn text(body: &str, reply_to: Option<&str>) -> wa::Message {
    match reply_context(reply_to) {
        None => wa::Message {
            conversation: Some(body.to_owned()),
            ..Default::default()
        },
        Some(ctx) => wa::Message {
            extended_text_message: Some(Box::new(ExtendedTextMessage {
                text: Some(body.to_owned()),
                context_info: Some(ctx),
                ..Default::default()
            })),
            ..Default::default()
        },
    }
}

/// A media message pointing at an uploaded, encrypted blob.
pub fn media(m: &Media, up: &UploadResponse, reply_to: Option<&str>, now_secs: i64) -> wa::Message {
    let url = Some(up.url.clone());
    let direct_path = Some(up.direct_path.clone());
    let media_key = Some(up.media_key.clone());
    let file_enc_sha256 = Some(up.file_enc_sha256.clone());
    let file_sha256 = Some(up.file_sha256.clone());
    let file_length = Some(up.file_length);
    let mimetype = Some(m.mimetype.clone());
    let caption = m.caption.clone();
    let context_info = reply_context(reply_to);
    let media_key_timestamp = Some(now_secs);
    let mut msg = wa::Message::default();
    match m.kind {
        MessageKind::Image => {
            msg.image_message = Some(Box::new(ImageMessage {
                url,
                direct_path,
                media_key,
                file_enc_sha256,
                file_sha256,
                file_length,
                mimetype,
                caption,
                context_info,
                media_key_timestamp,
                ..Default::default()
            }));
        }
        MessageKind::Video => {
            msg.video_message = Some(Box::new(VideoMessage {
                url,
                direct_path,
                media_key,
                file_enc_sha256,
                file_sha256,
                file_length,
                mimetype,
                caption,
                context_info,
                media_key_timestamp,
                ..Default::default()
            }));
        }
        MessageKind::Audio => {
            // Audio has no caption on WhatsApp; a given caption is not shown anywhere.
            msg.audio_message = Some(Box::new(AudioMessage {
                url,
                direct_path,
                media_key,
                file_enc_sha256,
                file_sha256,
                file_length,
                mimetype,
                ptt: Some(false),
                context_info,
                media_key_timestamp,
                ..Default::default()
            }));
        }
        MessageKind::Document | MessageKind::Text => {
            let name = m.filename.clone().unwrap_or_else(|| default_filename(&m.mimetype));
            msg.document_message = Some(Box::new(DocumentMessage {
                url,
                direct_path,
                media_key,
                file_enc_sha256,
                file_sha256,
                file_length,
                mimetype,
                title: Some(name.clone()),
                file_name: Some(name),
                caption,
                context_info,
                media_key_timestamp,
                ..Default::default()
            }));
        }
    }
    msg
}

/// A name for a document sent without one, so the receiver's phone can open it.
fn default_filename(mimetype: &str) -> String {
    let ext = match mimetype.split(';').next().unwrap_or("").trim() {
        "application/pdf" => "pdf",
        "text/plain" => "txt",
        "text/csv" => "csv",
        "application/zip" => "zip",
        "image/png" => "png",
        "image/jpeg" => "jpg",
        _ => "bin",
    };
    format!("document.{ext}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upload() -> UploadResponse {
        UploadResponse {
            url: "https://mmg.whatsapp.net/v/x.enc".into(),
            direct_path: "/v/x.enc".into(),
            media_key: vec![1; 32],
            file_enc_sha256: vec![2; 32],
            file_sha256: vec![3; 32],
            file_length: 42,
        }
    }

    fn media_of(kind: MessageKind, mimetype: &str, filename: Option<&str>, caption: Option<&str>) -> Media {
        Media {
            kind,
            data: vec![0; 42],
            mimetype: mimetype.into(),
            filename: filename.map(Into::into),
            caption: caption.map(Into::into),
        }
    }

    #[test]
    fn plain_text_is_a_conversation() {
        let m = text("hi", None);
        assert_eq!(m.conversation.as_deref(), Some("hi"));
        assert!(m.extended_text_message.is_none());
    }

    #[test]
    fn a_reply_quotes_the_message_id() {
        let m = text("re", Some("3EB0ABC"));
        let ext = m.extended_text_message.unwrap();
        assert_eq!(ext.text.as_deref(), Some("re"));
        assert_eq!(ext.context_info.unwrap().stanza_id.as_deref(), Some("3EB0ABC"));
        assert!(m.conversation.is_none());
    }

    #[test]
    fn image_carries_the_upload_and_caption() {
        let m = media(&media_of(MessageKind::Image, "image/png", None, Some("look")), &upload(), None, 7);
        let img = m.image_message.unwrap();
        assert_eq!(img.caption.as_deref(), Some("look"));
        assert_eq!(img.mimetype.as_deref(), Some("image/png"));
        assert_eq!(img.direct_path.as_deref(), Some("/v/x.enc"));
        assert_eq!(img.media_key.as_deref(), Some(&[1u8; 32][..]));
        assert_eq!(img.file_enc_sha256.as_deref(), Some(&[2u8; 32][..]));
        assert_eq!(img.file_sha256.as_deref(), Some(&[3u8; 32][..]));
        assert_eq!(img.file_length, Some(42));
        assert_eq!(img.media_key_timestamp, Some(7));
    }

    #[test]
    fn each_kind_lands_in_its_own_field() {
        let check = |kind, f: fn(&wa::Message) -> bool| {
            let m = media(&media_of(kind, "application/octet-stream", None, None), &upload(), Some("Q"), 0);
            assert!(f(&m), "{kind:?}");
        };
        check(MessageKind::Video, |m| m.video_message.as_ref().is_some_and(|v| v.context_info.is_some()));
        check(MessageKind::Audio, |m| m.audio_message.as_ref().is_some_and(|a| a.ptt == Some(false)));
        check(MessageKind::Document, |m| m.document_message.is_some());
    }

    #[test]
    fn documents_get_a_name() {
        let named = media(&media_of(MessageKind::Document, "application/pdf", Some("a.pdf"), Some("c")), &upload(), None, 0);
        let d = named.document_message.unwrap();
        assert_eq!((d.file_name.as_deref(), d.caption.as_deref()), (Some("a.pdf"), Some("c")));
        let unnamed = media(&media_of(MessageKind::Document, "application/pdf", None, None), &upload(), None, 0);
        assert_eq!(unnamed.document_message.unwrap().file_name.as_deref(), Some("document.pdf"));
    }

    #[test]
    fn media_types_follow_the_kind() {
        assert_eq!(media_type(MessageKind::Image), MediaType::Image);
        assert_eq!(media_type(MessageKind::Video), MediaType::Video);
        assert_eq!(media_type(MessageKind::Audio), MediaType::Audio);
        assert_eq!(media_type(MessageKind::Document), MediaType::Document);
    }
}
