//! wa-rs events as the session's [`EngineEvent`]s. Pure: a small [`Track`] of what was last
//! reported goes in, the steps the engine must take come out.

use chrono::{DateTime, Utc};
use wa_api::crd::{Account, Phase};
use wa_api::pod::{MessageStatus, QrCode, Receipt};
use wa_rs::Jid;
use wa_rs::types::events::{ConnectFailureReason, Event};
use wa_rs::types::message::MessageInfo;
use wa_rs::types::presence::ReceiptType;
use wa_rs::wa_rs_proto::whatsapp as wa;

use crate::engine::EngineEvent;

/// What the engine last told the session.
#[derive(Debug, Clone, PartialEq)]
pub struct Track {
    pub phase: Phase,
    pub account: Option<Account>,
}

impl Track {
    pub fn new(account: Option<Account>) -> Self {
        Self {
            phase: Phase::Starting,
            account,
        }
    }

    pub fn is_paired(&self) -> bool {
        self.account.is_some()
    }

    /// Moves to `phase` and says so, unless nothing changes.
    pub fn state(&mut self, phase: Phase, reason: Option<String>) -> Option<Step> {
        if phase == self.phase && reason.is_none() {
            return None;
        }
        self.phase = phase;
        Some(Step::Emit(EngineEvent::State {
            phase,
            account: if phase == Phase::LoggedOut { None } else { self.account.clone() },
            reason,
        }))
    }
}

/// What the engine does for one wa-rs event.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // short-lived, a handful per event
pub enum Step {
    Emit(EngineEvent),
    /// A message to turn into an inbound event (after fetching its media).
    Inbound(Box<wa::Message>, Box<MessageInfo>),
    /// WhatsApp unlinked this device: wipe the store, then report `LoggedOut`.
    LoggedOut(String),
}

/// The account behind our own JID.
pub fn account_of(jid: &Jid, push_name: &str) -> Account {
    Account {
        jid: format!("{}@s.whatsapp.net", jid.user),
        push_name: (!push_name.is_empty()).then(|| push_name.to_owned()),
    }
}

fn receipt_status(kind: &ReceiptType) -> Option<MessageStatus> {
    match kind {
        // wa-rs 0.2 reports a receipt without a type (how WhatsApp sends deliveries) as
        // Other("delivery"): both mean delivered.
        ReceiptType::Delivered => Some(MessageStatus::Delivered),
        ReceiptType::Other(s) if s == "delivery" => Some(MessageStatus::Delivered),
        ReceiptType::Read | ReceiptType::Played => Some(MessageStatus::Read),
        // Our own other devices reading, retries, server errors, history sync, …
        _ => None,
    }
}

fn logged_out_reason(reason: &ConnectFailureReason, on_connect: bool) -> String {
    let how = match reason {
        ConnectFailureReason::MainDeviceGone => "the phone's WhatsApp account is gone",
        ConnectFailureReason::UnknownLogout => "WhatsApp logged this device out",
        _ => "the device was unlinked from the phone",
    };
    if on_connect {
        format!("{how} (refused at login)")
    } else {
        how.to_owned()
    }
}

pub fn translate(event: &Event, track: &mut Track, now: DateTime<Utc>) -> Vec<Step> {
    let mut out = Vec::new();
    match event {
        Event::PairingQrCode { code, timeout } => {
            out.extend(track.state(Phase::AwaitingScan, None));
            out.push(Step::Emit(EngineEvent::Qr(QrCode {
                code: code.clone(),
                expires_at: now + chrono::Duration::from_std(*timeout).unwrap_or(chrono::Duration::seconds(20)),
            })));
        }
        Event::PairingCode { code, .. } => {
            out.extend(track.state(Phase::AwaitingScan, None));
            out.push(Step::Emit(EngineEvent::PairCode(code.clone())));
        }
        Event::PairSuccess(p) => {
            track.account = Some(account_of(&p.id, &p.business_name));
            // The device restarts its stream and logs in with the new identity.
            out.extend(track.state(Phase::Starting, Some("linked to the phone; logging in".into())));
        }
        Event::PairError(e) => {
            out.extend(track.state(Phase::AwaitingScan, Some(format!("pairing failed: {}", e.error))));
        }
        Event::Connected(_) => {
            if track.phase == Phase::Connected {
                // wa-rs restarts a stream silently after some stream errors; say so, so the
                // reconnect is visible in status and metrics.
                out.extend(track.state(Phase::Reconnecting, Some("WhatsApp restarted the stream".into())));
            }
            out.extend(track.state(Phase::Connected, None));
        }
        Event::SelfPushNameUpdated(u) => {
            if let Some(a) = track.account.as_mut() {
                a.push_name = (!u.new_name.is_empty()).then(|| u.new_name.clone());
                if track.phase == Phase::Connected {
                    out.push(Step::Emit(EngineEvent::State {
                        phase: Phase::Connected,
                        account: track.account.clone(),
                        reason: None,
                    }));
                }
            }
        }
        Event::Disconnected(_) if track.phase == Phase::Connected => {
            out.extend(track.state(Phase::Reconnecting, Some("connection to WhatsApp lost".into())));
        }
        Event::StreamError(e) if track.is_paired() => {
            out.extend(track.state(Phase::Reconnecting, Some(format!("stream error {}", e.code))));
        }
        Event::LoggedOut(l) => out.push(Step::LoggedOut(logged_out_reason(&l.reason, l.on_connect))),
        Event::StreamReplaced(_) => {
            out.extend(track.state(
                Phase::Failed,
                Some("another client connected with this session's identity; restart to take it back".into()),
            ));
        }
        Event::TemporaryBan(b) => {
            out.extend(track.state(
                Phase::Failed,
                Some(format!(
                    "WhatsApp banned this account temporarily ({:?}) for {} s",
                    b.code,
                    b.expire.num_seconds()
                )),
            ));
        }
        Event::ClientOutdated(_) => {
            out.extend(track.state(
                Phase::Failed,
                Some("WhatsApp refused this client version as outdated".into()),
            ));
        }
        Event::ConnectFailure(f) => {
            let reason = format!("WhatsApp refused the connection ({}): {}", f.reason.code(), f.message);
            let phase = if f.reason.should_reconnect() {
                Phase::Reconnecting
            } else {
                Phase::Failed
            };
            out.extend(track.state(phase, Some(reason)));
        }
        Event::Message(msg, info) if !info.source.is_from_me => {
            out.push(Step::Inbound(msg.clone(), Box::new(info.clone())));
        }
        Event::Receipt(r) => {
            if let Some(status) = receipt_status(&r.r#type) {
                let chat = format!("{}@{}", r.source.chat.user, r.source.chat.server);
                for id in &r.message_ids {
                    out.push(Step::Emit(EngineEvent::Receipt(Receipt {
                        message_id: id.clone(),
                        chat: chat.clone(),
                        status,
                        reason: None,
                    })));
                }
            }
        }
        _ => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use wa_rs::types::events::{Connected, Disconnected, LoggedOut, PairSuccess};

    fn t() -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000, 0).unwrap()
    }

    fn states(steps: &[Step]) -> Vec<(Phase, Option<String>)> {
        steps
            .iter()
            .filter_map(|s| match s {
                Step::Emit(EngineEvent::State { phase, reason, .. }) => Some((*phase, reason.clone())),
                _ => None,
            })
            .collect()
    }

    fn paired() -> Track {
        Track {
            phase: Phase::Connected,
            account: Some(Account {
                jid: "15550000001@s.whatsapp.net".into(),
                push_name: None,
            }),
        }
    }

    #[test]
    fn qr_codes_start_pairing_and_expire_with_their_timeout() {
        let mut tr = Track::new(None);
        let steps = translate(
            &Event::PairingQrCode {
                code: "2@a,b,c,d".into(),
                timeout: Duration::from_secs(60),
            },
            &mut tr,
            t(),
        );
        assert_eq!(states(&steps), vec![(Phase::AwaitingScan, None)]);
        match steps.last() {
            Some(Step::Emit(EngineEvent::Qr(q))) => {
                assert_eq!(q.code, "2@a,b,c,d");
                assert_eq!(q.expires_at, t() + chrono::Duration::seconds(60));
            }
            other => panic!("{other:?}"),
        }
        // The next code rotates in without another state change.
        let steps = translate(
            &Event::PairingQrCode {
                code: "2@e,b,c,d".into(),
                timeout: Duration::from_secs(20),
            },
            &mut tr,
            t(),
        );
        assert_eq!(steps.len(), 1);
    }

    #[test]
    fn pairing_then_login() {
        let mut tr = Track::new(None);
        translate(&Event::PairingCode { code: "ABCD1234".into(), timeout: Duration::from_secs(180) }, &mut tr, t());
        assert_eq!(tr.phase, Phase::AwaitingScan);
        let steps = translate(
            &Event::PairSuccess(PairSuccess {
                id: "15550000001:3@s.whatsapp.net".parse().unwrap(),
                lid: Jid::default(),
                business_name: String::new(),
                platform: String::new(),
            }),
            &mut tr,
            t(),
        );
        assert_eq!(states(&steps), vec![(Phase::Starting, Some("linked to the phone; logging in".into()))]);
        assert_eq!(tr.account.as_ref().unwrap().jid, "15550000001@s.whatsapp.net");
        let steps = translate(&Event::Connected(Connected), &mut tr, t());
        match &steps[..] {
            [Step::Emit(EngineEvent::State { phase: Phase::Connected, account: Some(a), reason: None })] => {
                assert_eq!(a.jid, "15550000001@s.whatsapp.net")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn connection_loss_and_silent_stream_restarts_are_reconnects() {
        let mut tr = paired();
        let s = translate(&Event::Disconnected(Disconnected), &mut tr, t());
        assert_eq!(states(&s), vec![(Phase::Reconnecting, Some("connection to WhatsApp lost".into()))]);
        let s = translate(&Event::Connected(Connected), &mut tr, t());
        assert_eq!(states(&s), vec![(Phase::Connected, None)]);
        let s = translate(&Event::Connected(Connected), &mut tr, t());
        assert_eq!(
            states(&s),
            vec![(Phase::Reconnecting, Some("WhatsApp restarted the stream".into())), (Phase::Connected, None)]
        );
        // Losing a connection that was never up is not a reconnect.
        let mut tr = Track::new(None);
        assert!(translate(&Event::Disconnected(Disconnected), &mut tr, t()).is_empty());
    }

    #[test]
    fn receipts_map_to_delivered_and_read() {
        use wa_rs::types::events::Receipt as WaReceipt;
        let mut tr = paired();
        let receipt = |kind: ReceiptType| {
            Event::Receipt(WaReceipt {
                message_ids: vec!["M1".into()],
                source: wa_rs::types::message::MessageSource {
                    chat: "15557654321@s.whatsapp.net".parse().unwrap(),
                    ..Default::default()
                },
                timestamp: t(),
                r#type: kind,
                message_sender: Jid::default(),
            })
        };
        let check = |kind: ReceiptType, expected: Option<MessageStatus>, tr: &mut Track| {
            let steps = translate(&receipt(kind.clone()), tr, t());
            let got = steps.iter().find_map(|s| match s {
                Step::Emit(EngineEvent::Receipt(r)) => {
                    assert_eq!((r.message_id.as_str(), r.chat.as_str()), ("M1", "15557654321@s.whatsapp.net"));
                    Some(r.status)
                }
                _ => None,
            });
            assert_eq!(got, expected, "{kind:?}");
        };
        check(ReceiptType::Delivered, Some(MessageStatus::Delivered), &mut tr);
        check(ReceiptType::Other("delivery".into()), Some(MessageStatus::Delivered), &mut tr);
        check(ReceiptType::Read, Some(MessageStatus::Read), &mut tr);
        check(ReceiptType::Played, Some(MessageStatus::Read), &mut tr);
        check(ReceiptType::ReadSelf, None, &mut tr);
        check(ReceiptType::Retry, None, &mut tr);
        check(ReceiptType::Other("inactive".into()), None, &mut tr);
    }

    #[test]
    fn logout_and_refusals() {
        let mut tr = paired();
        let s = translate(
            &Event::LoggedOut(LoggedOut { on_connect: true, reason: ConnectFailureReason::LoggedOut }),
            &mut tr,
            t(),
        );
        assert!(matches!(&s[..], [Step::LoggedOut(r)] if r == "the device was unlinked from the phone (refused at login)"));
        let s = translate(&Event::StreamReplaced(wa_rs::types::events::StreamReplaced), &mut tr, t());
        assert_eq!(states(&s)[0].0, Phase::Failed);
        let mut tr = paired();
        let s = translate(
            &Event::ConnectFailure(wa_rs::types::events::ConnectFailure {
                reason: ConnectFailureReason::ServiceUnavailable,
                message: "busy".into(),
                raw: None,
            }),
            &mut tr,
            t(),
        );
        assert_eq!(states(&s), vec![(Phase::Reconnecting, Some("WhatsApp refused the connection (503): busy".into()))]);
    }

    #[test]
    fn own_messages_are_not_inbound() {
        let mut tr = paired();
        let mut info = MessageInfo::default();
        info.source.is_from_me = true;
        let s = translate(&Event::Message(Box::default(), info.clone()), &mut tr, t());
        assert!(s.is_empty());
        info.source.is_from_me = false;
        let s = translate(&Event::Message(Box::default(), info), &mut tr, t());
        assert!(matches!(&s[..], [Step::Inbound(..)]));
    }

    #[test]
    fn push_name_updates_the_account() {
        let mut tr = paired();
        let s = translate(
            &Event::SelfPushNameUpdated(wa_rs::types::events::SelfPushNameUpdated {
                from_server: true,
                old_name: String::new(),
                new_name: "Alice".into(),
            }),
            &mut tr,
            t(),
        );
        match &s[..] {
            [Step::Emit(EngineEvent::State { account: Some(a), .. })] => assert_eq!(a.push_name.as_deref(), Some("Alice")),
            other => panic!("{other:?}"),
        }
    }
}
