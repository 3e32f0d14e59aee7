//! Incoming WhatsApp messages as the session's [`InboundMessage`]: who wrote, in which chat,
//! what kind, text or caption, and which media to fetch. Pure; the engine does the download.

use chrono::{DateTime, Utc};
use wa_api::pod::{InboundMedia, InboundMessage, MessageKind};
use wa_rs::Jid;
use wa_rs::download::Downloadable;
use wa_rs::types::message::MessageInfo;
use wa_rs::wa_rs_proto::whatsapp as wa;
use wa_rs::wa_rs_proto::whatsapp::message::{AudioMessage, DocumentMessage, ImageMessage, VideoMessage};

/// Media an inbound message points at.
#[derive(Debug, Clone, PartialEq)]
pub enum Fetch {
    Image(Box<ImageMessage>),
    Video(Box<VideoMessage>),
    Audio(Box<AudioMessage>),
    Document(Box<DocumentMessage>),
}

impl Fetch {
    pub fn downloadable(&self) -> &dyn Downloadable {
        match self {
            Self::Image(m) => m.as_ref(),
            Self::Video(m) => m.as_ref(),
            Self::Audio(m) => m.as_ref(),
            Self::Document(m) => m.as_ref(),
        }
    }

    /// The plaintext size the sender declared.
    pub fn declared_length(&self) -> Option<u64> {
        self.downloadable().file_length()
    }
}

/// An inbound message before its media is fetched.
#[derive(Debug, Clone, PartialEq)]
pub struct Draft {
    /// `media.data` is empty and `media.sha256` is the declared hash until the fetch.
    pub message: InboundMessage,
    pub fetch: Option<Fetch>,
}

/// The address to report: phone-number form when WhatsApp gave us both, without the device.
fn user_jid(primary: &Jid, alt: Option<&Jid>) -> String {
    let pick = match alt {
        Some(a) if primary.server == "lid" && a.server == "s.whatsapp.net" => a,
        _ => primary,
    };
    format!("{}@{}", pick.user, pick.server)
}

/// Looks through wrappers (disappearing, view-once, documents with caption) to the content.
fn unwrap(msg: &wa::Message) -> &wa::Message {
    for w in [
        &msg.ephemeral_message,
        &msg.view_once_message,
        &msg.view_once_message_v2,
        &msg.document_with_caption_message,
    ] {
        if let Some(inner) = w.as_deref().and_then(|f| f.message.as_deref()) {
            return unwrap(inner);
        }
    }
    msg
}

fn declared_media(mimetype: &Option<String>, filename: Option<String>, length: Option<u64>, sha256: &Option<Vec<u8>>) -> InboundMedia {
    InboundMedia {
        mimetype: mimetype.clone().unwrap_or_else(|| "application/octet-stream".into()),
        filename,
        size: length.unwrap_or(0),
        sha256: sha256.as_deref().map(hex::encode).unwrap_or_default(),
        data: None,
    }
}

/// `None` for what is not a user-visible message from someone else (own messages synced from
/// the phone, protocol messages, reactions, kinds the API has no type for).
pub fn draft(msg: &wa::Message, info: &MessageInfo) -> Option<Draft> {
    if info.source.is_from_me {
        return None;
    }
    let from = user_jid(&info.source.sender, info.source.sender_alt.as_ref());
    let chat = if info.source.is_group {
        format!("{}@{}", info.source.chat.user, info.source.chat.server)
    } else {
        // In a direct chat the chat is the sender; prefer its phone-number form too.
        user_jid(&info.source.chat, info.source.sender_alt.as_ref())
    };
    let push_name = (!info.push_name.is_empty()).then(|| info.push_name.clone());
    let timestamp: DateTime<Utc> = info.timestamp;
    let base = |kind: MessageKind| InboundMessage {
        message_id: info.id.clone(),
        from: from.clone(),
        chat: chat.clone(),
        push_name: push_name.clone(),
        message_type: kind,
        text: None,
        caption: None,
        media: None,
        timestamp,
    };
    let m = unwrap(msg);
    if let Some(text) = &m.conversation {
        return Some(Draft {
            message: InboundMessage {
                text: Some(text.clone()),
                ..base(MessageKind::Text)
            },
            fetch: None,
        });
    }
    if let Some(ext) = &m.extended_text_message {
        return Some(Draft {
            message: InboundMessage {
                text: ext.text.clone(),
                ..base(MessageKind::Text)
            },
            fetch: None,
        });
    }
    if let Some(i) = &m.image_message {
        return Some(Draft {
            message: InboundMessage {
                caption: i.caption.clone(),
                media: Some(declared_media(&i.mimetype, None, i.file_length, &i.file_sha256)),
                ..base(MessageKind::Image)
            },
            fetch: Some(Fetch::Image(i.clone())),
        });
    }
    if let Some(v) = &m.video_message {
        return Some(Draft {
            message: InboundMessage {
                caption: v.caption.clone(),
                media: Some(declared_media(&v.mimetype, None, v.file_length, &v.file_sha256)),
                ..base(MessageKind::Video)
            },
            fetch: Some(Fetch::Video(v.clone())),
        });
    }
    if let Some(a) = &m.audio_message {
        return Some(Draft {
            message: InboundMessage {
                media: Some(declared_media(&a.mimetype, None, a.file_length, &a.file_sha256)),
                ..base(MessageKind::Audio)
            },
            fetch: Some(Fetch::Audio(a.clone())),
        });
    }
    if let Some(d) = &m.document_message {
        let name = d.file_name.clone().or_else(|| d.title.clone());
        return Some(Draft {
            message: InboundMessage {
                caption: d.caption.clone(),
                media: Some(declared_media(&d.mimetype, name, d.file_length, &d.file_sha256)),
                ..base(MessageKind::Document)
            },
            fetch: Some(Fetch::Document(d.clone())),
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use wa_rs::types::message::MessageSource;
    use wa_rs::wa_rs_proto::whatsapp::message::FutureProofMessage;

    fn jid(s: &str) -> Jid {
        s.parse().unwrap()
    }

    fn info(sender: &str, alt: Option<&str>, from_me: bool) -> MessageInfo {
        MessageInfo {
            id: "ABC".into(),
            source: MessageSource {
                chat: jid(sender),
                sender: jid(sender),
                is_from_me: from_me,
                sender_alt: alt.map(jid),
                ..Default::default()
            },
            push_name: "Bob".into(),
            timestamp: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            ..Default::default()
        }
    }

    fn text(t: &str) -> wa::Message {
        wa::Message {
            conversation: Some(t.into()),
            ..Default::default()
        }
    }

    #[test]
    fn a_text_from_a_contact() {
        let d = draft(&text("hello"), &info("15551234567@s.whatsapp.net", None, false)).unwrap();
        assert_eq!(d.message.message_type, MessageKind::Text);
        assert_eq!(d.message.text.as_deref(), Some("hello"));
        assert_eq!(d.message.from, "15551234567@s.whatsapp.net");
        assert_eq!(d.message.chat, "15551234567@s.whatsapp.net");
        assert_eq!(d.message.push_name.as_deref(), Some("Bob"));
        assert_eq!(d.message.message_id, "ABC");
        assert!(d.fetch.is_none());
    }

    #[test]
    fn lid_senders_are_reported_by_phone_number_when_known() {
        let d = draft(&text("x"), &info("100000000001@lid", Some("15551234567@s.whatsapp.net"), false)).unwrap();
        assert_eq!(d.message.from, "15551234567@s.whatsapp.net");
        let d = draft(&text("x"), &info("100000000001@lid", None, false)).unwrap();
        assert_eq!(d.message.from, "100000000001@lid");
    }

    #[test]
    fn device_parts_are_dropped() {
        let d = draft(&text("x"), &info("15551234567:12@s.whatsapp.net", None, false)).unwrap();
        assert_eq!(d.message.from, "15551234567@s.whatsapp.net");
    }

    #[test]
    fn own_messages_and_unsupported_kinds_are_not_inbound() {
        assert!(draft(&text("x"), &info("15551234567@s.whatsapp.net", None, true)).is_none());
        let reaction = wa::Message {
            reaction_message: Some(Default::default()),
            ..Default::default()
        };
        assert!(draft(&reaction, &info("15551234567@s.whatsapp.net", None, false)).is_none());
    }

    #[test]
    fn media_is_declared_then_fetched() {
        let img = wa::Message {
            ephemeral_message: Some(Box::new(FutureProofMessage {
                message: Some(Box::new(wa::Message {
                    image_message: Some(Box::new(ImageMessage {
                        caption: Some("pic".into()),
                        mimetype: Some("image/jpeg".into()),
                        file_length: Some(1234),
                        file_sha256: Some(vec![0xab; 32]),
                        ..Default::default()
                    })),
                    ..Default::default()
                })),
            })),
            ..Default::default()
        };
        let d = draft(&img, &info("15551234567@s.whatsapp.net", None, false)).unwrap();
        assert_eq!(d.message.message_type, MessageKind::Image);
        assert_eq!(d.message.caption.as_deref(), Some("pic"));
        let m = d.message.media.unwrap();
        assert_eq!((m.mimetype.as_str(), m.size, m.data), ("image/jpeg", 1234, None));
        assert_eq!(m.sha256, "ab".repeat(32));
        assert_eq!(d.fetch.unwrap().declared_length(), Some(1234));
    }

    #[test]
    fn documents_keep_their_name() {
        let doc = wa::Message {
            document_message: Some(Box::new(DocumentMessage {
                file_name: Some("a.pdf".into()),
                mimetype: Some("application/pdf".into()),
                ..Default::default()
            })),
            ..Default::default()
        };
        let d = draft(&doc, &info("15551234567@s.whatsapp.net", None, false)).unwrap();
        assert_eq!(d.message.message_type, MessageKind::Document);
        assert_eq!(d.message.media.unwrap().filename.as_deref(), Some("a.pdf"));
    }
}
