//! What a decrypted `Message` protobuf says, in plain terms, and the protobufs simulated
//! contacts send.

use wa_rs_proto::whatsapp as wa;
use wa_rs_proto::whatsapp::message::{AudioMessage, DocumentMessage, ExtendedTextMessage, ImageMessage, VideoMessage};

use crate::media::{MediaKind, Sealed};

/// A media attachment as a message describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaRef {
    pub kind: MediaKind,
    pub direct_path: Option<String>,
    pub url: Option<String>,
    pub media_key: Vec<u8>,
    pub file_enc_sha256: Option<Vec<u8>>,
    pub file_sha256: Option<Vec<u8>>,
    pub file_length: Option<u64>,
    pub mimetype: Option<String>,
    pub filename: Option<String>,
}

/// The user-visible content of a message.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Summary {
    /// `text`, `image`, `video`, `audio`, `document`, or `other` (protocol and unknown kinds).
    pub kind: String,
    pub text: Option<String>,
    pub caption: Option<String>,
    pub media: Option<MediaRef>,
    /// Id of the quoted message.
    pub reply_to: Option<String>,
    /// The chat a device-sent copy was for (own devices get `DeviceSentMessage`).
    pub sent_to: Option<String>,
}

fn quoted(ctx: Option<&wa::ContextInfo>) -> Option<String> {
    ctx.and_then(|c| c.stanza_id.clone())
}

/// Reads a message, looking through the wrappers (device-sent copies, disappearing and
/// view-once messages, documents with captions).
pub fn summarize(msg: &wa::Message) -> Summary {
    if let Some(dsm) = &msg.device_sent_message {
        let mut s = dsm.message.as_deref().map(summarize).unwrap_or_default();
        s.sent_to = dsm.destination_jid.clone();
        return s;
    }
    for wrapped in [
        &msg.ephemeral_message,
        &msg.view_once_message,
        &msg.view_once_message_v2,
        &msg.document_with_caption_message,
    ] {
        if let Some(inner) = wrapped.as_deref().and_then(|f| f.message.as_deref()) {
            return summarize(inner);
        }
    }
    if let Some(text) = &msg.conversation {
        return Summary {
            kind: "text".into(),
            text: Some(text.clone()),
            ..Default::default()
        };
    }
    if let Some(ext) = &msg.extended_text_message {
        return Summary {
            kind: "text".into(),
            text: ext.text.clone(),
            reply_to: quoted(ext.context_info.as_deref()),
            ..Default::default()
        };
    }
    let media = |kind: MediaKind,
                 direct_path: &Option<String>,
                 url: &Option<String>,
                 key: &Option<Vec<u8>>,
                 enc: &Option<Vec<u8>>,
                 sha: &Option<Vec<u8>>,
                 len: Option<u64>,
                 mimetype: &Option<String>,
                 filename: Option<String>| MediaRef {
        kind,
        direct_path: direct_path.clone(),
        url: url.clone(),
        media_key: key.clone().unwrap_or_default(),
        file_enc_sha256: enc.clone(),
        file_sha256: sha.clone(),
        file_length: len,
        mimetype: mimetype.clone(),
        filename,
    };
    if let Some(m) = &msg.image_message {
        return Summary {
            kind: "image".into(),
            caption: m.caption.clone(),
            reply_to: quoted(m.context_info.as_deref()),
            media: Some(media(MediaKind::Image, &m.direct_path, &m.url, &m.media_key, &m.file_enc_sha256, &m.file_sha256, m.file_length, &m.mimetype, None)),
            ..Default::default()
        };
    }
    if let Some(m) = &msg.video_message {
        return Summary {
            kind: "video".into(),
            caption: m.caption.clone(),
            reply_to: quoted(m.context_info.as_deref()),
            media: Some(media(MediaKind::Video, &m.direct_path, &m.url, &m.media_key, &m.file_enc_sha256, &m.file_sha256, m.file_length, &m.mimetype, None)),
            ..Default::default()
        };
    }
    if let Some(m) = &msg.audio_message {
        return Summary {
            kind: "audio".into(),
            reply_to: quoted(m.context_info.as_deref()),
            media: Some(media(MediaKind::Audio, &m.direct_path, &m.url, &m.media_key, &m.file_enc_sha256, &m.file_sha256, m.file_length, &m.mimetype, None)),
            ..Default::default()
        };
    }
    if let Some(m) = &msg.document_message {
        return Summary {
            kind: "document".into(),
            caption: m.caption.clone(),
            reply_to: quoted(m.context_info.as_deref()),
            media: Some(media(MediaKind::Document, &m.direct_path, &m.url, &m.media_key, &m.file_enc_sha256, &m.file_sha256, m.file_length, &m.mimetype, m.file_name.clone())),
            ..Default::default()
        };
    }
    Summary {
        kind: "other".into(),
        ..Default::default()
    }
}

pub fn text_message(text: &str) -> wa::Message {
    wa::Message {
        conversation: Some(text.to_owned()),
        ..Default::default()
    }
}

/// A text that quotes another message.
pub fn reply_message(text: &str, quoted_id: &str) -> wa::Message {
    wa::Message {
        extended_text_message: Some(Box::new(ExtendedTextMessage {
            text: Some(text.to_owned()),
            context_info: Some(Box::new(wa::ContextInfo {
                stanza_id: Some(quoted_id.to_owned()),
                ..Default::default()
            })),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// Where an uploaded blob can be fetched.
pub struct Uploaded<'a> {
    pub url: &'a str,
    pub direct_path: &'a str,
}

pub fn media_message(
    kind: MediaKind,
    sealed: &Sealed,
    at: &Uploaded<'_>,
    length: u64,
    mimetype: &str,
    filename: Option<&str>,
    caption: Option<&str>,
) -> wa::Message {
    let ts = Some(chrono::Utc::now().timestamp());
    let url = Some(at.url.to_owned());
    let direct_path = Some(at.direct_path.to_owned());
    let media_key = Some(sealed.media_key.to_vec());
    let enc = Some(sealed.file_enc_sha256.to_vec());
    let sha = Some(sealed.file_sha256.to_vec());
    let mimetype = Some(mimetype.to_owned());
    let caption = caption.map(str::to_owned);
    let mut msg = wa::Message::default();
    match kind {
        MediaKind::Image => {
            msg.image_message = Some(Box::new(ImageMessage {
                url,
                direct_path,
                media_key,
                file_enc_sha256: enc,
                file_sha256: sha,
                file_length: Some(length),
                mimetype,
                caption,
                media_key_timestamp: ts,
                ..Default::default()
            }))
        }
        MediaKind::Video => {
            msg.video_message = Some(Box::new(VideoMessage {
                url,
                direct_path,
                media_key,
                file_enc_sha256: enc,
                file_sha256: sha,
                file_length: Some(length),
                mimetype,
                caption,
                media_key_timestamp: ts,
                ..Default::default()
            }))
        }
        MediaKind::Audio => {
            msg.audio_message = Some(Box::new(AudioMessage {
                url,
                direct_path,
                media_key,
                file_enc_sha256: enc,
                file_sha256: sha,
                file_length: Some(length),
                mimetype,
                media_key_timestamp: ts,
                ..Default::default()
            }))
        }
        MediaKind::Document => {
            msg.document_message = Some(Box::new(DocumentMessage {
                url,
                direct_path,
                media_key,
                file_enc_sha256: enc,
                file_sha256: sha,
                file_length: Some(length),
                mimetype,
                caption,
                file_name: filename.map(str::to_owned),
                title: filename.map(str::to_owned),
                media_key_timestamp: ts,
                ..Default::default()
            }))
        }
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries() {
        let s = summarize(&text_message("hi"));
        assert_eq!((s.kind.as_str(), s.text.as_deref()), ("text", Some("hi")));

        let s = summarize(&reply_message("re", "ABC"));
        assert_eq!((s.text.as_deref(), s.reply_to.as_deref()), (Some("re"), Some("ABC")));

        let wrapped = wa::Message {
            device_sent_message: Some(Box::new(wa::message::DeviceSentMessage {
                destination_jid: Some("1555@s.whatsapp.net".into()),
                message: Some(Box::new(wa::Message {
                    ephemeral_message: Some(Box::new(wa::message::FutureProofMessage {
                        message: Some(Box::new(text_message("deep"))),
                    })),
                    ..Default::default()
                })),
                phash: None,
            })),
            ..Default::default()
        };
        let s = summarize(&wrapped);
        assert_eq!(s.text.as_deref(), Some("deep"));
        assert_eq!(s.sent_to.as_deref(), Some("1555@s.whatsapp.net"));

        let sealed = crate::media::seal(b"pdf bytes", MediaKind::Document).unwrap();
        let at = Uploaded { url: "https://h/p", direct_path: "/p" };
        let m = media_message(MediaKind::Document, &sealed, &at, 9, "application/pdf", Some("a.pdf"), Some("cap"));
        let s = summarize(&m);
        assert_eq!(s.kind, "document");
        assert_eq!(s.caption.as_deref(), Some("cap"));
        let media = s.media.unwrap();
        assert_eq!(media.filename.as_deref(), Some("a.pdf"));
        assert_eq!(media.media_key, sealed.media_key.to_vec());

        assert_eq!(summarize(&wa::Message::default()).kind, "other");
    }
}
