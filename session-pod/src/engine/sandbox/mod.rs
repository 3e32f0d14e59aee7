//! The `sandbox` engine: WhatsApp's side simulated in-process, so integrators can build
//! against the API without a phone and the whole system is testable offline.
//!
//! It behaves like the real engine at the seam: QR codes rotate while pairing (or a pair code
//! is issued when a phone number is given), a simulated phone links through
//! [`SandboxControl::scan`], the linked identity is kept in `<data-dir>/sandbox/identity.json`
//! so a restarted process comes back `Connected` without a new scan, sends get WhatsApp-like
//! ids and move sent → delivered → read, contacts write through [`SandboxControl::inbound`],
//! and [`SandboxControl::disconnect`] drops the network for a while.
//!
//! One deliberate failure: recipients whose number starts with `999` (not an assigned country
//! code) are "not on WhatsApp", and sends to them fail as WhatsApp would refuse them.

mod ids;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use wa_api::crd::{Account, Phase};
use wa_api::pod::{InboundMessage, MessageStatus, OutgoingMessage, QrCode, Receipt, ScanRequest};
use wa_api::{Jid, PhoneNumber};

use super::{Engine, EngineContext, EngineError, EngineEvent, SandboxControl, SentMessage};
pub use ids::{inbound_message_id, outgoing_message_id, pair_code};

/// The account a scan links when the request names none.
pub const DEFAULT_PHONE: &str = "+15550000001";
/// Recipients starting with these digits are not on WhatsApp.
pub const UNREACHABLE_PREFIX: &str = "999";

/// Timing of the simulation. Defaults are close to WhatsApp's; tests shorten them.
#[derive(Debug, Clone)]
pub struct SandboxOptions {
    /// How long each QR code is valid before the next one replaces it (WhatsApp: ~20 s).
    pub qr_period: Duration,
    /// After a send, when the recipient's phone reports "delivered".
    pub delivered_after: Duration,
    /// After a send, when the recipient reports "read".
    pub read_after: Duration,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        Self {
            qr_period: Duration::from_secs(20),
            delivered_after: Duration::from_secs(1),
            read_after: Duration::from_secs(3),
        }
    }
}

/// The linked account, as kept on the data volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Identity {
    jid: String,
    push_name: Option<String>,
    paired_at: DateTime<Utc>,
}

impl Identity {
    fn account(&self) -> Account {
        Account {
            jid: self.jid.clone(),
            push_name: self.push_name.clone(),
        }
    }
}

/// Where the simulated connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Stopped,
    Pairing,
    Connected,
    Reconnecting,
    LoggedOut,
}

pub struct SandboxEngine {
    inner: Arc<Inner>,
}

struct Inner {
    ctx: EngineContext,
    opts: SandboxOptions,
    state: Mutex<State>,
    receipts: Mutex<ReceiptQueue>,
    receipts_wake: Notify,
}

struct State {
    link: Link,
    identity: Option<Identity>,
    /// The phone number given at start: pair by code instead of QR.
    start_phone: Option<PhoneNumber>,
    qr_keys: Option<ids::QrKeys>,
    current_qr: Option<String>,
    pair: Option<(String, PhoneNumber)>,
    /// Bumped by every transition; a timer task whose generation is stale does nothing.
    generation: u64,
    tasks: Vec<AbortHandle>,
    receipt_task: Option<AbortHandle>,
}

/// Receipts due later, in due order (the delays are constant, so FIFO is due order).
#[derive(Default)]
struct ReceiptQueue {
    delivered: VecDeque<(Instant, Receipt)>,
    read: VecDeque<(Instant, Receipt)>,
}

impl SandboxEngine {
    pub fn new(ctx: EngineContext, opts: SandboxOptions) -> Arc<Self> {
        Arc::new(Self {
            inner: Arc::new(Inner {
                ctx,
                opts,
                state: Mutex::new(State {
                    link: Link::Stopped,
                    identity: None,
                    start_phone: None,
                    qr_keys: None,
                    current_qr: None,
                    pair: None,
                    generation: 0,
                    tasks: Vec::new(),
                    receipt_task: None,
                }),
                receipts: Mutex::new(ReceiptQueue::default()),
                receipts_wake: Notify::new(),
            }),
        })
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn emit(&self, e: EngineEvent) {
        // The session drains this channel for as long as the process runs; a closed channel
        // means it is shutting down, when nothing is left to tell.
        let _ = self.ctx.events.send(e);
    }

    fn state_event(&self, phase: Phase, account: Option<Account>, reason: Option<&str>) {
        self.emit(EngineEvent::State {
            phase,
            account,
            reason: reason.map(str::to_owned),
        });
    }

    fn identity_path(&self) -> PathBuf {
        self.ctx.data_dir.join("sandbox").join("identity.json")
    }

    fn load_identity(&self) -> Result<Option<Identity>, EngineError> {
        let path = self.identity_path();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                EngineError::Internal(anyhow::anyhow!(
                    "{} is not a sandbox identity: {e}",
                    path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(EngineError::Internal(anyhow::anyhow!(
                "reading {}: {e}",
                path.display()
            ))),
        }
    }

    fn save_identity(&self, id: &Identity) -> Result<(), EngineError> {
        let dir = self.ctx.data_dir.join("sandbox");
        let json = serde_json::to_vec_pretty(id).map_err(|e| EngineError::Internal(e.into()))?;
        std::fs::create_dir_all(&dir)
            .and_then(|()| crate::outbox::write_atomically(&dir, "identity.json", &json))
            .map_err(|e| EngineError::Internal(anyhow::anyhow!("saving the sandbox identity: {e}")))
    }

    fn wipe_identity(&self) -> Result<(), EngineError> {
        match std::fs::remove_file(self.identity_path()) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(EngineError::Internal(anyhow::anyhow!(
                "wiping the sandbox identity: {e}"
            ))),
        }
    }

    /// Ends whatever timers the previous state had running.
    fn transition(s: &mut State, link: Link) -> u64 {
        for t in s.tasks.drain(..) {
            t.abort();
        }
        s.generation += 1;
        s.link = link;
        if link != Link::Pairing {
            s.current_qr = None;
            s.pair = None;
            s.qr_keys = None;
        }
        s.generation
    }

    /// Connects with the stored identity, or starts pairing.
    fn connect_or_pair(self: &Arc<Self>, s: &mut State) {
        if let Some(id) = s.identity.clone() {
            Self::transition(s, Link::Connected);
            self.state_event(Phase::Connected, Some(id.account()), None);
            return;
        }
        let generation = Self::transition(s, Link::Pairing);
        self.state_event(Phase::AwaitingScan, None, None);
        match s.start_phone.clone() {
            Some(phone) => {
                let code = pair_code(&mut rand::rng());
                s.pair = Some((code.clone(), phone));
                self.emit(EngineEvent::PairCode(code));
            }
            None => {
                s.qr_keys = Some(ids::QrKeys::generate(&mut rand::rng()));
                let me = self.clone();
                let task = tokio::spawn(async move { me.rotate_qr(generation).await });
                s.tasks.push(task.abort_handle());
            }
        }
    }

    /// Shows a new QR code every `qr_period` for as long as this pairing attempt lasts.
    async fn rotate_qr(self: Arc<Self>, generation: u64) {
        loop {
            {
                let mut s = self.lock();
                if s.generation != generation {
                    return;
                }
                let Some(keys) = s.qr_keys.clone() else {
                    return;
                };
                let code = keys.qr_text(&mut rand::rng());
                s.current_qr = Some(code.clone());
                let expires_at = Utc::now()
                    + chrono::Duration::from_std(self.opts.qr_period)
                        .unwrap_or(chrono::Duration::seconds(20));
                self.emit(EngineEvent::Qr(QrCode { code, expires_at }));
            }
            tokio::time::sleep(self.opts.qr_period).await;
        }
    }

    /// Hands out receipts when they are due; one task for all messages.
    async fn run_receipts(self: Arc<Self>) {
        loop {
            let next_due = {
                let mut q = self.receipts.lock().unwrap_or_else(|p| p.into_inner());
                let now = Instant::now();
                let mut due = Vec::new();
                let ReceiptQueue { delivered, read } = &mut *q;
                for queue in [delivered, read] {
                    while queue.front().is_some_and(|(at, _)| *at <= now) {
                        if let Some((_, r)) = queue.pop_front() {
                            due.push(r);
                        }
                    }
                    // A burst of sends leaves a large empty buffer behind; give it back.
                    if queue.is_empty() && queue.capacity() > 256 {
                        queue.shrink_to(16);
                    }
                }
                let next = [q.delivered.front(), q.read.front()]
                    .into_iter()
                    .flatten()
                    .map(|(at, _)| *at)
                    .min();
                drop(q);
                // Delivered before read when both fall due at once.
                due.sort_by_key(|r| r.status.rank());
                let logged_out = self.lock().link == Link::LoggedOut;
                for r in due {
                    if !logged_out {
                        self.emit(EngineEvent::Receipt(r));
                    }
                }
                next
            };
            match next_due {
                Some(at) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {}
                        () = self.receipts_wake.notified() => {}
                    }
                }
                None => self.receipts_wake.notified().await,
            }
        }
    }

    fn schedule_receipts(&self, id: &str, chat: &Jid) {
        let now = Instant::now();
        let receipt = |status| Receipt {
            message_id: id.to_owned(),
            chat: chat.to_string(),
            status,
            reason: None,
        };
        let read_after = self.opts.read_after.max(self.opts.delivered_after);
        let mut q = self.receipts.lock().unwrap_or_else(|p| p.into_inner());
        q.delivered.push_back((
            now + self.opts.delivered_after,
            receipt(MessageStatus::Delivered),
        ));
        q.read
            .push_back((now + read_after, receipt(MessageStatus::Read)));
        drop(q);
        self.receipts_wake.notify_one();
    }
}

fn phase_of(link: Link) -> &'static str {
    match link {
        Link::Stopped => "stopped",
        Link::Pairing => "awaiting a scan",
        Link::Connected => "connected",
        Link::Reconnecting => "reconnecting",
        Link::LoggedOut => "logged out",
    }
}

#[async_trait]
impl Engine for SandboxEngine {
    fn kind(&self) -> wa_api::Engine {
        wa_api::Engine::Sandbox
    }

    async fn start(&self, phone: Option<PhoneNumber>) -> Result<(), EngineError> {
        let identity = self.inner.load_identity()?;
        let mut s = self.inner.lock();
        if s.receipt_task.is_none() {
            let me = self.inner.clone();
            s.receipt_task = Some(tokio::spawn(me.run_receipts()).abort_handle());
        }
        s.identity = identity;
        s.start_phone = phone;
        self.inner.connect_or_pair(&mut s);
        Ok(())
    }

    async fn pair_code(&self, phone: &PhoneNumber) -> Result<String, EngineError> {
        let mut s = self.inner.lock();
        match s.link {
            Link::Pairing => {}
            Link::Connected | Link::Reconnecting => return Err(EngineError::AlreadyPaired),
            other => {
                return Err(EngineError::NotConnected(format!(
                    "no pairing in progress (the session is {}); POST /v1/restart to pair again",
                    phase_of(other)
                )));
            }
        }
        let code = pair_code(&mut rand::rng());
        s.pair = Some((code.clone(), phone.clone()));
        self.inner.emit(EngineEvent::PairCode(code.clone()));
        Ok(code)
    }

    async fn send(&self, msg: &OutgoingMessage) -> Result<SentMessage, EngineError> {
        let link = self.inner.lock().link;
        if link != Link::Connected {
            return Err(EngineError::NotConnected(phase_of(link).into()));
        }
        let chat = msg.to.to_jid();
        if chat.user.starts_with(UNREACHABLE_PREFIX) && !chat.is_group() {
            return Err(EngineError::NotOnWhatsapp(format!("+{}", chat.user)));
        }
        let id = outgoing_message_id(&mut rand::rng());
        self.inner.schedule_receipts(&id, &chat);
        Ok(SentMessage {
            id,
            chat,
            timestamp: Utc::now(),
        })
    }

    async fn logout(&self) -> Result<(), EngineError> {
        self.inner.wipe_identity()?;
        let mut s = self.inner.lock();
        s.identity = None;
        Inner::transition(&mut s, Link::LoggedOut);
        self.inner
            .state_event(Phase::LoggedOut, None, Some("logged out"));
        Ok(())
    }

    async fn restart(&self) -> Result<(), EngineError> {
        let identity = self.inner.load_identity()?;
        let mut s = self.inner.lock();
        s.identity = identity;
        if s.identity.is_some() {
            Inner::transition(&mut s, Link::Stopped);
            self.inner
                .state_event(Phase::Starting, None, Some("restarting"));
        }
        self.inner.connect_or_pair(&mut s);
        Ok(())
    }

    async fn shutdown(&self) {
        let mut s = self.inner.lock();
        Inner::transition(&mut s, Link::Stopped);
        if let Some(t) = s.receipt_task.take() {
            t.abort();
        }
    }

    fn sandbox(&self) -> Option<&dyn SandboxControl> {
        Some(self)
    }
}

#[async_trait]
impl SandboxControl for SandboxEngine {
    async fn scan(&self, req: &ScanRequest) -> Result<(), EngineError> {
        let mut s = self.inner.lock();
        match s.link {
            Link::Pairing => {}
            Link::Connected | Link::Reconnecting => return Err(EngineError::AlreadyPaired),
            other => {
                return Err(EngineError::NotConnected(format!(
                    "nothing to scan: the session is {}; POST /v1/restart to pair again",
                    phase_of(other)
                )));
            }
        }
        if let Some(code) = &req.code {
            let matches_qr = s.current_qr.as_deref() == Some(code.as_str());
            let matches_pair = s
                .pair
                .as_ref()
                .is_some_and(|(c, _)| c.eq_ignore_ascii_case(&code.replace('-', "")));
            if !matches_qr && !matches_pair {
                return Err(EngineError::Refused(
                    "code does not match the QR code or pair code currently shown".into(),
                ));
            }
        }
        let phone = match &req.phone_number {
            Some(p) => p
                .parse::<PhoneNumber>()
                .map_err(|e| EngineError::Refused(e.to_string()))?,
            None => match &s.pair {
                Some((_, p)) => p.clone(),
                None => DEFAULT_PHONE
                    .parse()
                    .map_err(|e| EngineError::Internal(anyhow::anyhow!("default phone: {e}")))?,
            },
        };
        let identity = Identity {
            jid: phone.to_jid().to_string(),
            push_name: Some(
                req.push_name
                    .clone()
                    .unwrap_or_else(|| "Sandbox Phone".into()),
            ),
            paired_at: Utc::now(),
        };
        // Durable before reported: a crash right after "Connected" must not forget the link.
        self.inner.save_identity(&identity)?;
        s.identity = Some(identity.clone());
        Inner::transition(&mut s, Link::Connected);
        self.inner
            .state_event(Phase::Connected, Some(identity.account()), None);
        Ok(())
    }

    async fn inbound(&self, mut msg: InboundMessage) -> Result<String, EngineError> {
        let link = self.inner.lock().link;
        if link != Link::Connected {
            return Err(EngineError::NotConnected(phase_of(link).into()));
        }
        if msg.message_id.is_empty() {
            msg.message_id = inbound_message_id(&mut rand::rng());
        }
        let id = msg.message_id.clone();
        self.inner.emit(EngineEvent::Inbound(msg));
        Ok(id)
    }

    async fn disconnect(&self, seconds: u32) -> Result<(), EngineError> {
        let mut s = self.inner.lock();
        if s.link != Link::Connected {
            return Err(EngineError::NotConnected(phase_of(s.link).into()));
        }
        let generation = Inner::transition(&mut s, Link::Reconnecting);
        self.inner.state_event(
            Phase::Reconnecting,
            None,
            Some(&format!("network dropped (sandbox); back in {seconds} s")),
        );
        let me = self.inner.clone();
        let task = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(u64::from(seconds))).await;
            let mut s = me.lock();
            if s.generation != generation {
                return;
            }
            Inner::transition(&mut s, Link::Connected);
            let account = s.identity.as_ref().map(Identity::account);
            me.state_event(Phase::Connected, account, None);
        });
        s.tasks.push(task.abort_handle());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;
    use wa_api::pod::{Content, OutgoingMessage};

    fn engine(
        dir: &std::path::Path,
        opts: SandboxOptions,
    ) -> (Arc<SandboxEngine>, mpsc::UnboundedReceiver<EngineEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let ctx = EngineContext {
            data_dir: dir.to_owned(),
            events: tx,
            media_max_bytes: 1024,
        };
        (SandboxEngine::new(ctx, opts), rx)
    }

    fn fast() -> SandboxOptions {
        SandboxOptions {
            qr_period: Duration::from_millis(50),
            delivered_after: Duration::from_millis(10),
            read_after: Duration::from_millis(20),
        }
    }

    fn text(to: &str) -> OutgoingMessage {
        OutgoingMessage {
            to: to.parse().unwrap(),
            content: Content::Text("hi".into()),
            reply_to: None,
        }
    }

    async fn next(rx: &mut mpsc::UnboundedReceiver<EngineEvent>) -> EngineEvent {
        tokio::time::timeout(Duration::from_secs(2), rx.recv())
            .await
            .expect("event in time")
            .expect("open")
    }

    fn phase(e: &EngineEvent) -> Option<Phase> {
        match e {
            EngineEvent::State { phase, .. } => Some(*phase),
            _ => None,
        }
    }

    #[tokio::test]
    async fn qr_rotates_scan_pairs_and_identity_survives() {
        let dir = tempfile::tempdir().unwrap();
        let (e, mut rx) = engine(dir.path(), fast());
        e.start(None).await.unwrap();
        assert_eq!(phase(&next(&mut rx).await), Some(Phase::AwaitingScan));
        let EngineEvent::Qr(q1) = next(&mut rx).await else {
            panic!("qr")
        };
        let EngineEvent::Qr(q2) = next(&mut rx).await else {
            panic!("qr")
        };
        assert_ne!(q1.code, q2.code, "QR codes rotate");
        assert!(matches!(
            e.send(&text("+15551234567")).await,
            Err(EngineError::NotConnected(_))
        ));
        // A stale code is refused.
        let stale = ScanRequest {
            code: Some(q1.code.clone()),
            ..Default::default()
        };
        assert!(matches!(e.scan(&stale).await, Err(EngineError::Refused(_))));
        e.scan(&ScanRequest {
            code: Some(q2.code),
            ..Default::default()
        })
        .await
        .unwrap();
        let connected = loop {
            let ev = next(&mut rx).await;
            if phase(&ev).is_some() {
                break ev;
            }
        };
        let EngineEvent::State {
            phase: Phase::Connected,
            account: Some(a),
            ..
        } = connected
        else {
            panic!("{connected:?}")
        };
        assert_eq!(a.jid, "15550000001@s.whatsapp.net");
        assert!(matches!(
            e.scan(&ScanRequest::default()).await,
            Err(EngineError::AlreadyPaired)
        ));
        e.shutdown().await;

        // A new engine on the same directory connects without a scan.
        let (e2, mut rx2) = engine(dir.path(), fast());
        e2.start(None).await.unwrap();
        assert_eq!(phase(&next(&mut rx2).await), Some(Phase::Connected));
        e2.shutdown().await;
    }

    #[tokio::test]
    async fn receipts_follow_sends_and_unreachable_numbers_fail() {
        let dir = tempfile::tempdir().unwrap();
        let (e, mut rx) = engine(dir.path(), fast());
        e.start(Some("+15557654321".parse().unwrap()))
            .await
            .unwrap();
        assert_eq!(phase(&next(&mut rx).await), Some(Phase::AwaitingScan));
        let EngineEvent::PairCode(code) = next(&mut rx).await else {
            panic!("pair code")
        };
        e.scan(&ScanRequest {
            code: Some(format!("{}-{}", &code[..4], &code[4..])),
            ..Default::default()
        })
        .await
        .unwrap();
        let EngineEvent::State {
            account: Some(a), ..
        } = next(&mut rx).await
        else {
            panic!()
        };
        assert_eq!(
            a.jid, "15557654321@s.whatsapp.net",
            "pair-code number becomes the account"
        );

        let sent = e.send(&text("+15551234567")).await.unwrap();
        assert!(sent.id.starts_with("3EB0") && sent.id.len() == 22);
        let mut statuses = Vec::new();
        while statuses.len() < 2 {
            if let EngineEvent::Receipt(r) = next(&mut rx).await {
                assert_eq!(r.message_id, sent.id);
                assert_eq!(r.chat, "15551234567@s.whatsapp.net");
                statuses.push(r.status);
            }
        }
        assert_eq!(statuses, [MessageStatus::Delivered, MessageStatus::Read]);
        assert!(matches!(
            e.send(&text("+9995551234")).await,
            Err(EngineError::NotOnWhatsapp(who)) if who == "+9995551234"
        ));
    }

    #[tokio::test]
    async fn disconnect_reconnects_and_logout_wipes() {
        let dir = tempfile::tempdir().unwrap();
        let (e, mut rx) = engine(dir.path(), fast());
        e.start(None).await.unwrap();
        e.scan(&ScanRequest::default()).await.unwrap();
        e.disconnect(0).await.unwrap();
        let mut phases = Vec::new();
        while phases.last() != Some(&Phase::Connected) || phases.len() < 3 {
            if let Some(p) = phase(&next(&mut rx).await) {
                phases.push(p);
            }
        }
        assert_eq!(
            phases,
            [
                Phase::AwaitingScan,
                Phase::Connected,
                Phase::Reconnecting,
                Phase::Connected
            ]
        );
        assert!(dir.path().join("sandbox/identity.json").exists());
        e.logout().await.unwrap();
        assert!(!dir.path().join("sandbox/identity.json").exists());
        assert!(matches!(
            e.send(&text("+15551234567")).await,
            Err(EngineError::NotConnected(_))
        ));
        assert!(matches!(
            e.scan(&ScanRequest::default()).await,
            Err(EngineError::NotConnected(_))
        ));
        // Restart after logout pairs again.
        e.restart().await.unwrap();
        let mut after_logout = Vec::new();
        while after_logout.last() != Some(&Phase::AwaitingScan) {
            after_logout.extend(phase(&next(&mut rx).await));
        }
        assert_eq!(after_logout, [Phase::LoggedOut, Phase::AwaitingScan]);
        assert!(
            matches!(next(&mut rx).await, EngineEvent::Qr(_)),
            "pairing by QR again"
        );
    }
}
