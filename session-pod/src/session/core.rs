//! The engine-agnostic state of a session, as a pure state machine: [`EngineEvent`]s in,
//! status changes and outbox events out. No I/O, no clocks (callers pass `now`), so every
//! rule here is tested with plain data.

use chrono::{DateTime, Utc};
use wa_api::crd::{Account, Phase};
use wa_api::pod::{EventBody, MessageInfo, MessageKind, MessageStatus, PodStatus, QrCode, Receipt};

use super::message_log::MessageLog;
use crate::engine::{EngineEvent, SentMessage};

/// What applying one event changed.
#[derive(Debug, Default, PartialEq)]
pub struct Applied {
    /// The event to deliver to the gateway, if any.
    pub event: Option<EventBody>,
    /// `PodStatus` changed (its version moved).
    pub status_changed: bool,
    /// The session lost its connection and started reconnecting.
    pub reconnect: bool,
    /// A message arrived.
    pub inbound: bool,
    /// A receipt for a sent message, with its status.
    pub receipt: Option<MessageStatus>,
}

/// The current QR code, or why there is none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QrView {
    Available(QrCode),
    AlreadyPaired,
    NotAvailable(String),
}

pub struct SessionCore {
    status: PodStatus,
    qr: Option<QrCode>,
    log: MessageLog,
}

impl SessionCore {
    /// A session that has just started: phase `Starting`, version 1.
    pub fn new(
        session: &str,
        engine: wa_api::Engine,
        log_capacity: usize,
        now: DateTime<Utc>,
    ) -> Self {
        Self {
            status: PodStatus {
                session: session.to_owned(),
                engine,
                phase: Phase::Starting,
                account: None,
                since: now,
                last_error: None,
                pair_code: None,
                version: 1,
            },
            qr: None,
            log: MessageLog::new(log_capacity),
        }
    }

    pub fn status(&self) -> &PodStatus {
        &self.status
    }

    /// The first state event of a process: tells the gateway the session (re)started.
    pub fn boot_event(&self) -> EventBody {
        EventBody::State {
            phase: self.status.phase,
            account: None,
            reason: Some("session pod started".into()),
        }
    }

    pub fn apply(&mut self, event: EngineEvent, now: DateTime<Utc>) -> Applied {
        match event {
            EngineEvent::Qr(code) => {
                // A QR only makes sense while not paired; a late one after pairing is stale.
                if !self.is_paired() {
                    self.qr = Some(code);
                }
                Applied::default()
            }
            EngineEvent::PairCode(code) => {
                if self.is_paired() || self.status.pair_code.as_deref() == Some(code.as_str()) {
                    return Applied::default();
                }
                self.status.pair_code = Some(code);
                self.bump();
                Applied {
                    status_changed: true,
                    ..Applied::default()
                }
            }
            EngineEvent::State {
                phase,
                account,
                reason,
            } => self.apply_state(phase, account, reason, now),
            EngineEvent::Inbound(m) => Applied {
                event: Some(EventBody::Message(m)),
                inbound: true,
                ..Applied::default()
            },
            EngineEvent::Receipt(r) => {
                self.log
                    .update(&r.message_id, r.status, r.reason.clone(), now);
                Applied {
                    receipt: Some(r.status),
                    event: Some(EventBody::Receipt(r)),
                    ..Applied::default()
                }
            }
        }
    }

    fn apply_state(
        &mut self,
        phase: Phase,
        account: Option<Account>,
        reason: Option<String>,
        now: DateTime<Utc>,
    ) -> Applied {
        let new_account = match phase {
            // Logged out: the account is gone with the auth state.
            Phase::LoggedOut => None,
            _ => account.or_else(|| self.status.account.clone()),
        };
        let new_error = match phase {
            Phase::Connected => None,
            _ => reason.clone().or_else(|| {
                // Keep the last error while still in the phase that produced it.
                (phase == self.status.phase)
                    .then(|| self.status.last_error.clone())
                    .flatten()
            }),
        };
        if phase == self.status.phase
            && new_account == self.status.account
            && new_error == self.status.last_error
        {
            return Applied::default();
        }
        let reconnect = phase == Phase::Reconnecting && self.status.phase != Phase::Reconnecting;
        if phase != self.status.phase {
            self.status.since = now;
        }
        self.status.phase = phase;
        self.status.account = new_account;
        self.status.last_error = new_error;
        if phase != Phase::AwaitingScan {
            self.status.pair_code = None;
            self.qr = None;
        }
        self.bump();
        Applied {
            event: Some(EventBody::State {
                phase,
                account: self.status.account.clone(),
                reason,
            }),
            status_changed: true,
            reconnect,
            ..Applied::default()
        }
    }

    fn bump(&mut self) {
        self.status.version += 1;
    }

    fn is_paired(&self) -> bool {
        self.status.phase.is_paired()
    }

    /// The QR code to show now.
    pub fn qr(&self, now: DateTime<Utc>) -> QrView {
        if self.is_paired() {
            return QrView::AlreadyPaired;
        }
        match self.status.phase {
            Phase::AwaitingScan => match &self.qr {
                Some(q) if q.expires_at > now => QrView::Available(q.clone()),
                Some(_) => QrView::NotAvailable(
                    "the QR code expired and no new one has come yet; try again in a moment".into(),
                ),
                None if self.status.pair_code.is_some() => QrView::NotAvailable(
                    "pairing by phone number: enter the pair code on the phone".into(),
                ),
                None => QrView::NotAvailable("no QR code yet; try again in a moment".into()),
            },
            Phase::Starting => {
                QrView::NotAvailable("the session is starting; try again in a moment".into())
            }
            Phase::LoggedOut => QrView::NotAvailable(
                "the session is logged out; POST /v1/restart to pair again".into(),
            ),
            Phase::Failed => QrView::NotAvailable(format!(
                "the session failed: {}",
                self.status
                    .last_error
                    .as_deref()
                    .unwrap_or("see the pod log")
            )),
            other => QrView::NotAvailable(format!("no QR code in phase {other}")),
        }
    }

    /// Records a message WhatsApp accepted and returns its "sent" receipt.
    pub fn record_sent(
        &mut self,
        kind: MessageKind,
        sent: &SentMessage,
        now: DateTime<Utc>,
    ) -> Receipt {
        let chat = sent.chat.to_string();
        self.log.insert(MessageInfo {
            id: sent.id.clone(),
            to: chat.clone(),
            kind,
            status: MessageStatus::Sent,
            timestamp: sent.timestamp,
            updated_at: now,
            error: None,
        });
        Receipt {
            message_id: sent.id.clone(),
            chat,
            status: MessageStatus::Sent,
            reason: None,
        }
    }

    pub fn message(&self, id: &str) -> Option<MessageInfo> {
        self.log.get(id)
    }

    pub fn logged_messages(&self) -> usize {
        self.log.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + s, 0).single().unwrap()
    }

    fn state(phase: Phase, jid: Option<&str>, reason: Option<&str>) -> EngineEvent {
        EngineEvent::State {
            phase,
            account: jid.map(|j| Account {
                jid: j.into(),
                push_name: None,
            }),
            reason: reason.map(Into::into),
        }
    }

    fn qr(code: &str, expires: i64) -> EngineEvent {
        EngineEvent::Qr(QrCode {
            code: code.into(),
            expires_at: t(expires),
        })
    }

    /// Applies `events` (second, event) in order and checks phase, account, version and
    /// which ones produced outbox events.
    fn check(
        events: Vec<(i64, EngineEvent)>,
        phase: Phase,
        jid: Option<&str>,
        version: u64,
        outbox: usize,
    ) {
        let mut core = SessionCore::new("s", wa_api::Engine::Sandbox, 10, t(0));
        let mut produced = 0;
        for (at, e) in events {
            produced += usize::from(core.apply(e, t(at)).event.is_some());
        }
        let s = core.status();
        assert_eq!(
            (
                s.phase,
                s.account.as_ref().map(|a| a.jid.as_str()),
                s.version,
                produced
            ),
            (phase, jid, version, outbox)
        );
    }

    #[test]
    fn phase_machine() {
        use Phase::*;
        const J: &str = "1@s.whatsapp.net";
        check(vec![], Starting, None, 1, 0);
        check(
            vec![(1, state(AwaitingScan, None, None))],
            AwaitingScan,
            None,
            2,
            1,
        );
        // The same state twice is one change.
        check(
            vec![
                (1, state(AwaitingScan, None, None)),
                (2, state(AwaitingScan, None, None)),
            ],
            AwaitingScan,
            None,
            2,
            1,
        );
        check(
            vec![
                (1, state(AwaitingScan, None, None)),
                (2, state(Connected, Some(J), None)),
            ],
            Connected,
            Some(J),
            3,
            2,
        );
        // Reconnecting keeps the account; connecting again too.
        check(
            vec![
                (1, state(Connected, Some(J), None)),
                (2, state(Reconnecting, None, Some("net"))),
                (3, state(Connected, None, None)),
            ],
            Connected,
            Some(J),
            4,
            3,
        );
        // Logging out forgets the account.
        check(
            vec![
                (1, state(Connected, Some(J), None)),
                (2, state(LoggedOut, Some(J), None)),
            ],
            LoggedOut,
            None,
            3,
            2,
        );
        // QR codes, inbound messages and receipts do not move the status version.
        check(
            vec![
                (1, state(AwaitingScan, None, None)),
                (2, qr("a", 30)),
                (
                    3,
                    EngineEvent::Receipt(Receipt {
                        message_id: "m".into(),
                        chat: J.into(),
                        status: MessageStatus::Read,
                        reason: None,
                    }),
                ),
            ],
            AwaitingScan,
            None,
            2,
            2,
        );
    }

    #[test]
    fn since_moves_only_with_the_phase_and_errors_clear_on_connect() {
        let mut core = SessionCore::new("s", wa_api::Engine::Sandbox, 10, t(0));
        core.apply(
            state(Phase::Connected, Some("1@s.whatsapp.net"), None),
            t(1),
        );
        let a = core.apply(state(Phase::Reconnecting, None, Some("stream error")), t(5));
        assert!(a.reconnect && a.status_changed);
        assert_eq!(core.status().since, t(5));
        assert_eq!(core.status().last_error.as_deref(), Some("stream error"));
        // Still reconnecting, no new reason: nothing changes, the error stays.
        let a = core.apply(state(Phase::Reconnecting, None, None), t(7));
        assert_eq!(a, Applied::default());
        assert_eq!(core.status().last_error.as_deref(), Some("stream error"));
        // A new reason in the same phase is a change, but not a new reconnect.
        let a = core.apply(state(Phase::Reconnecting, None, Some("timeout")), t(8));
        assert!(a.status_changed && !a.reconnect);
        assert_eq!(core.status().since, t(5));
        core.apply(state(Phase::Connected, None, None), t(9));
        assert_eq!(core.status().last_error, None);
        assert_eq!(core.status().since, t(9));
    }

    #[test]
    fn qr_view() {
        let mut core = SessionCore::new("s", wa_api::Engine::Sandbox, 10, t(0));
        assert!(matches!(core.qr(t(0)), QrView::NotAvailable(m) if m.contains("starting")));
        core.apply(state(Phase::AwaitingScan, None, None), t(1));
        assert!(matches!(core.qr(t(1)), QrView::NotAvailable(m) if m.contains("no QR code yet")));
        core.apply(qr("code-1", 20), t(1));
        assert_eq!(
            core.qr(t(10)),
            QrView::Available(QrCode {
                code: "code-1".into(),
                expires_at: t(20)
            })
        );
        assert!(matches!(core.qr(t(20)), QrView::NotAvailable(m) if m.contains("expired")));
        core.apply(qr("code-2", 40), t(20));
        assert!(matches!(core.qr(t(21)), QrView::Available(q) if q.code == "code-2"));
        core.apply(
            state(Phase::Connected, Some("1@s.whatsapp.net"), None),
            t(22),
        );
        assert_eq!(core.qr(t(22)), QrView::AlreadyPaired);
        // A stale QR after pairing is ignored.
        core.apply(qr("late", 60), t(23));
        assert_eq!(core.qr(t(23)), QrView::AlreadyPaired);
        core.apply(state(Phase::LoggedOut, None, None), t(24));
        assert!(matches!(core.qr(t(24)), QrView::NotAvailable(m) if m.contains("logged out")));
    }

    #[test]
    fn pair_code_shown_until_pairing_ends() {
        let mut core = SessionCore::new("s", wa_api::Engine::Sandbox, 10, t(0));
        core.apply(state(Phase::AwaitingScan, None, None), t(1));
        let a = core.apply(EngineEvent::PairCode("ABCDEFGH".into()), t(2));
        assert!(a.status_changed && a.event.is_none());
        assert_eq!(core.status().pair_code.as_deref(), Some("ABCDEFGH"));
        assert_eq!(
            core.apply(EngineEvent::PairCode("ABCDEFGH".into()), t(3)),
            Applied::default()
        );
        core.apply(
            state(Phase::Connected, Some("1@s.whatsapp.net"), None),
            t(4),
        );
        assert_eq!(core.status().pair_code, None);
    }

    #[test]
    fn sent_messages_follow_receipts_forward_only() {
        let mut core = SessionCore::new("s", wa_api::Engine::Sandbox, 10, t(0));
        let sent = SentMessage {
            id: "3EB0AAAAAAAAAAAAAAAAAA".into(),
            chat: "1@s.whatsapp.net".parse().unwrap(),
            timestamp: t(1),
        };
        let r = core.record_sent(MessageKind::Text, &sent, t(1));
        assert_eq!(
            (r.status, r.chat.as_str()),
            (MessageStatus::Sent, "1@s.whatsapp.net")
        );
        // Through the event loop it becomes an outbox event and leaves the status alone.
        let a = core.apply(EngineEvent::Receipt(r), t(1));
        assert!(matches!(a.event, Some(EventBody::Receipt(_))) && !a.status_changed);
        assert_eq!(core.message(&sent.id).unwrap().status, MessageStatus::Sent);
        let receipt = |status| {
            EngineEvent::Receipt(Receipt {
                message_id: sent.id.clone(),
                chat: "1@s.whatsapp.net".into(),
                status,
                reason: None,
            })
        };
        core.apply(receipt(MessageStatus::Read), t(3));
        core.apply(receipt(MessageStatus::Delivered), t(4)); // late, stale
        let m = core.message(&sent.id).unwrap();
        assert_eq!((m.status, m.updated_at), (MessageStatus::Read, t(3)));
        assert!(core.message("unknown").is_none());
    }
}
