//! The last N sent messages and their status, for `GET /v1/messages/{id}`.
//!
//! In memory and bounded: the gateway keeps the full history; the pod answers for recent
//! messages only (and forgets them on restart). Status only moves forward
//! ([`MessageStatus::rank`]), so a late "delivered" cannot undo a "read".

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use wa_api::pod::{MessageInfo, MessageKind, MessageStatus};

/// Receipts for ids not (yet) in the log are kept this long, in number of ids: a real engine
/// may report a receipt before the send call that produced the id has returned.
const EARLY_RECEIPTS: usize = 256;

pub struct MessageLog {
    capacity: usize,
    /// Compact on purpose: 10,000 of these stay in memory (the id is shared with `order`).
    messages: HashMap<Arc<str>, Entry>,
    order: VecDeque<Arc<str>>,
    early: HashMap<String, (MessageStatus, Option<String>, DateTime<Utc>)>,
    early_order: VecDeque<String>,
}

struct Entry {
    to: Box<str>,
    kind: MessageKind,
    status: MessageStatus,
    timestamp: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    error: Option<Box<str>>,
}

impl Entry {
    fn info(&self, id: &str) -> MessageInfo {
        MessageInfo {
            id: id.to_owned(),
            to: self.to.to_string(),
            kind: self.kind,
            status: self.status,
            timestamp: self.timestamp,
            updated_at: self.updated_at,
            error: self.error.as_deref().map(str::to_owned),
        }
    }

    fn advance(&mut self, status: MessageStatus, error: Option<String>, at: DateTime<Utc>) {
        if status.rank() > self.status.rank() {
            self.status = status;
            self.updated_at = at;
            if status == MessageStatus::Failed {
                self.error = error.map(String::into_boxed_str);
            }
        }
    }
}

impl MessageLog {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            messages: HashMap::new(),
            order: VecDeque::new(),
            early: HashMap::new(),
            early_order: VecDeque::new(),
        }
    }

    pub fn insert(&mut self, info: MessageInfo) {
        let mut entry = Entry {
            to: info.to.into_boxed_str(),
            kind: info.kind,
            status: info.status,
            timestamp: info.timestamp,
            updated_at: info.updated_at,
            error: info.error.map(String::into_boxed_str),
        };
        if let Some((status, error, at)) = self.early.remove(&info.id) {
            self.early_order.retain(|id| id != &info.id);
            entry.advance(status, error, at);
        }
        let id: Arc<str> = Arc::from(info.id);
        if self.messages.insert(id.clone(), entry).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.messages.remove(&old);
            }
        }
    }

    /// Moves a message's status forward; unknown ids are held briefly in case their send
    /// is still returning.
    pub fn update(
        &mut self,
        id: &str,
        status: MessageStatus,
        error: Option<String>,
        now: DateTime<Utc>,
    ) {
        if let Some(m) = self.messages.get_mut(id) {
            m.advance(status, error, now);
            return;
        }
        match self.early.get_mut(id) {
            Some(e) if status.rank() > e.0.rank() => *e = (status, error, now),
            Some(_) => {}
            None => {
                self.early.insert(id.to_owned(), (status, error, now));
                self.early_order.push_back(id.to_owned());
                while self.early_order.len() > EARLY_RECEIPTS {
                    if let Some(old) = self.early_order.pop_front() {
                        self.early.remove(&old);
                    }
                }
            }
        }
    }

    pub fn get(&self, id: &str) -> Option<MessageInfo> {
        self.messages.get(id).map(|e| e.info(id))
    }

    pub fn len(&self) -> usize {
        self.messages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wa_api::pod::MessageKind;

    fn info(id: &str) -> MessageInfo {
        MessageInfo {
            id: id.into(),
            to: "1@s.whatsapp.net".into(),
            kind: MessageKind::Text,
            status: MessageStatus::Sent,
            timestamp: Utc::now(),
            updated_at: Utc::now(),
            error: None,
        }
    }

    #[test]
    fn bounded_oldest_first() {
        let mut log = MessageLog::new(3);
        for i in 0..5 {
            log.insert(info(&format!("m{i}")));
        }
        assert_eq!(log.len(), 3);
        assert!(log.get("m1").is_none());
        assert!(log.get("m2").is_some() && log.get("m4").is_some());
    }

    #[test]
    fn status_moves_forward_only() {
        use MessageStatus::*;
        let check = |updates: &[MessageStatus], expected: MessageStatus| {
            let mut log = MessageLog::new(3);
            log.insert(info("m"));
            for s in updates {
                log.update("m", *s, Some("why".into()), Utc::now());
            }
            assert_eq!(log.get("m").unwrap().status, expected, "{updates:?}");
        };
        check(&[Delivered], Delivered);
        check(&[Delivered, Read], Read);
        check(&[Read, Delivered], Read);
        check(&[Failed], Failed);
        check(&[Delivered, Failed], Delivered);
        check(&[Queued], Sent);
    }

    #[test]
    fn receipt_before_insert_is_applied() {
        let mut log = MessageLog::new(3);
        log.update("m", MessageStatus::Delivered, None, Utc::now());
        log.update("m", MessageStatus::Sent, None, Utc::now());
        log.insert(info("m"));
        assert_eq!(log.get("m").unwrap().status, MessageStatus::Delivered);
        // Early receipts are bounded too.
        for i in 0..EARLY_RECEIPTS * 2 {
            log.update(&format!("x{i}"), MessageStatus::Read, None, Utc::now());
        }
        assert!(log.early.len() <= EARLY_RECEIPTS);
    }
}
