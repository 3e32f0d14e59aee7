//! The `whatsapp` engine: WhatsApp Web multi-device through the `wa-rs` crate.
//!
//! One wa-rs client per pairing ("generation"), its auth state in SQLite under
//! `<data_dir>/whatsapp/` (see [`store`]). Three background tasks per generation:
//! - wa-rs's own run loop (connect, handshake, reconnect with its backoff);
//! - a **supervisor** that starts that loop again when it ends by itself (the QR codes of a
//!   pairing ran out, or wa-rs gave up) and carries out restart and stop commands;
//! - an **event pump** that takes wa-rs events in order, turns them into [`EngineEvent`]s
//!   ([`events::translate`]), downloads inbound media under the media cap, and wipes the
//!   store when WhatsApp unlinks the device.
//!
//! wa-rs has no logout call: logging out is the `remove-companion-device` query, then a
//! disconnect and a wipe of the store.

mod events;
mod http;
mod inbound;
mod outgoing;
pub mod store;

use std::collections::HashSet;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine as _;
use chrono::Utc;
use sha2::{Digest, Sha256};
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};
use wa_api::crd::Phase;
use wa_api::pod::{Content, OutgoingMessage};
use wa_api::{PhoneNumber, Recipient};
use wa_rs::bot::Bot;
use wa_rs::store::SqliteStore;
use wa_rs::transport::TokioWebSocketTransportFactory;
use wa_rs::types::events::{Event, EventHandler};

use self::events::{Step, Track};
use self::http::EngineHttp;
use super::{Engine, EngineContext, EngineError, EngineEvent, SentMessage};

/// `tracing` filter directives that keep wa-rs (logging through the `log` bridge, partly
/// under its own targets like `Client/Recv`) at warnings; append them to the default filter.
pub const WA_RS_LOG_DIRECTIVES: &str = "wa_rs=warn,wa_rs_core=warn,wa_rs_tokio_transport=warn,wa_rs_sqlite_storage=warn,\
wa_rs_libsignal=warn,wa_rs_noise=warn,Client=warn,Bot=warn,AppState=warn,UnifiedSession=warn,TcToken=warn,\
Chatstate=warn,ChatstateHandler=warn,Blocking=warn,blocklist=warn,usync=warn,signal_session_store=warn";

/// Where the engine connects, and how. The defaults are production: WhatsApp's own servers.
#[derive(Debug, Clone)]
pub struct WhatsAppOptions {
    /// WebSocket URL of the chat server (`--wa-server-url` / `WA_SERVER_URL`).
    pub server_url: Option<String>,
    /// Base URL that replaces every HTTPS host the engine contacts: media hosts and the
    /// web client version check (`--wa-media-url` / `WA_MEDIA_URL`).
    pub media_url: Option<String>,
    /// Web client version to announce instead of checking WhatsApp Web's current one daily.
    pub client_version: Option<(u32, u32, u32)>,
    /// Longest time one send may take (upload, session setup, encryption, write).
    pub send_timeout: Duration,
    /// After this long without reaching WhatsApp, the status says the engine is still trying.
    pub slow_connect: Duration,
}

impl Default for WhatsAppOptions {
    fn default() -> Self {
        Self {
            server_url: None,
            media_url: None,
            client_version: None,
            send_timeout: Duration::from_secs(60),
            slow_connect: Duration::from_secs(20),
        }
    }
}

/// Recipients known to be on WhatsApp are remembered up to this many.
const KNOWN_RECIPIENTS: usize = 4096;
/// How long `pair_code` waits for the socket before giving up.
const SOCKET_WAIT: Duration = Duration::from_secs(15);
/// How long the unlink query may take at logout.
const UNLINK_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest time a stop waits for the connection to close.
const STOP_WAIT: Duration = Duration::from_secs(3);
/// First and longest pause before the supervisor starts a finished run loop again.
const RERUN_MIN: Duration = Duration::from_secs(1);
const RERUN_MAX: Duration = Duration::from_secs(60);

/// State shared by the engine and its background tasks.
struct Core {
    ctx: EngineContext,
    opts: WhatsAppOptions,
    /// `Err` only if the HTTP client could not be built (reported at start).
    http: Result<Arc<EngineHttp>, String>,
    track: StdMutex<Track>,
    /// A logout is in progress: late events of the old connection are ignored.
    logging_out: std::sync::atomic::AtomicBool,
    /// Phone numbers (digits) that usync confirmed are on WhatsApp.
    on_whatsapp: StdMutex<HashSet<String>>,
    /// The running generation; `None` before start and after a logout.
    live: Mutex<Option<Live>>,
}

/// One wa-rs client and its tasks.
struct Live {
    client: Arc<wa_rs::Client>,
    commands: mpsc::UnboundedSender<Command>,
    supervisor: JoinHandle<()>,
    pump_stop: CancellationToken,
    pump: JoinHandle<()>,
}

enum Command {
    /// Drop the connection and connect again.
    Restart,
    /// Disconnect for good; answers once the run loop ended.
    Stop(oneshot::Sender<()>),
}

pub struct WhatsAppEngine {
    core: Arc<Core>,
}

impl WhatsAppEngine {
    pub fn new(ctx: EngineContext, opts: WhatsAppOptions) -> Arc<Self> {
        // Inbound media up to the cap, plus AES padding and the MAC.
        let max_body = ctx.media_max_bytes.saturating_add(64 * 1024);
        let http = EngineHttp::new(opts.media_url.clone(), max_body)
            .map(Arc::new)
            .map_err(|e| format!("{e:#}"));
        Arc::new(Self {
            core: Arc::new(Core {
                ctx,
                opts,
                http,
                track: StdMutex::new(Track::new(None)),
                logging_out: std::sync::atomic::AtomicBool::new(false),
                on_whatsapp: StdMutex::new(HashSet::new()),
                live: Mutex::new(None),
            }),
        })
    }

    /// The wa-rs client of the running generation (for tests and diagnostics).
    pub async fn client(&self) -> Option<Arc<wa_rs::Client>> {
        self.core.live.lock().await.as_ref().map(|l| l.client.clone())
    }
}

impl Core {
    fn emit(&self, e: EngineEvent) {
        let _ = self.ctx.events.send(e);
    }

    fn track(&self) -> std::sync::MutexGuard<'_, Track> {
        self.track.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_state(&self, phase: Phase, reason: Option<String>) {
        let step = self.track().state(phase, reason);
        if let Some(Step::Emit(e)) = step {
            self.emit(e);
        }
    }

    /// Opens (or creates) the store and starts a client on it. Caller holds `live`.
    async fn launch(self: &Arc<Self>, slot: &mut Option<Live>, phone: Option<PhoneNumber>) -> Result<(), EngineError> {
        let http = self
            .http
            .clone()
            .map_err(|e| EngineError::Internal(anyhow::anyhow!("cannot build the HTTP client: {e}")))?;
        let data_dir = self.ctx.data_dir.clone();
        let dir = tokio::task::spawn_blocking(move || store::open_or_create(&data_dir))
            .await
            .map_err(|e| EngineError::Internal(e.into()))?
            .map_err(|e| EngineError::Internal(anyhow::anyhow!("cannot create the auth store directory: {e}")))?;
        let db = dir.join(store::DB_FILE);
        let backend = SqliteStore::new(&db.to_string_lossy())
            .await
            .map_err(|e| EngineError::Internal(anyhow::anyhow!("cannot open the auth store {}: {e}", db.display())))?;

        let mut transport = TokioWebSocketTransportFactory::new();
        if let Some(url) = &self.opts.server_url {
            transport = transport.with_url(url.clone());
        }
        let mut builder = Bot::builder()
            .with_backend(Arc::new(backend))
            .with_transport_factory(transport)
            .with_http_client(HttpShim(http))
            .with_device_props(
                Some("wa-operator".into()),
                None,
                Some(wa_rs::wa_rs_proto::whatsapp::device_props::PlatformType::Desktop),
            )
            .skip_history_sync();
        if let Some(v) = self.opts.client_version {
            builder = builder.with_version(v);
        }
        let mut bot = builder
            .build()
            .await
            .map_err(|e| EngineError::Internal(anyhow::anyhow!("cannot build the WhatsApp client: {e}")))?;
        let client = bot.client();

        let stored = client.get_pn().await;
        let account = match &stored {
            Some(pn) => Some(events::account_of(pn, &client.get_push_name().await)),
            None => None,
        };
        *self.track() = Track::new(account.clone());
        self.logging_out.store(false, std::sync::atomic::Ordering::SeqCst);
        self.emit(EngineEvent::State {
            phase: Phase::Starting,
            account,
            reason: Some(if stored.is_some() {
                "connecting with the stored identity".into()
            } else {
                "connecting to pair a new device".into()
            }),
        });

        // Our handler runs inside wa-rs's dispatch, so events reach the pump in order.
        let (event_tx, event_rx) = mpsc::unbounded_channel();
        client.register_handler(Arc::new(Forwarder(event_tx)));
        let run = bot
            .run()
            .await
            .map_err(|e| EngineError::Internal(anyhow::anyhow!("cannot start the WhatsApp client: {e}")))?;

        let span = tracing::info_span!("whatsapp", store = %dir.display());
        let pump_stop = CancellationToken::new();
        let pump = tokio::spawn(
            self.clone()
                .pump(client.clone(), event_rx, pump_stop.clone())
                .instrument(span.clone()),
        );
        let (commands, command_rx) = mpsc::unbounded_channel();
        let supervisor = tokio::spawn(self.clone().supervise(client.clone(), run, command_rx).instrument(span));

        if let (None, Some(phone)) = (&stored, phone) {
            let core = self.clone();
            let c = client.clone();
            tokio::spawn(async move {
                if let Err(e) = core.request_pair_code(&c, &phone).await {
                    warn!(error = %e, "pair code request failed");
                    core.set_state(Phase::AwaitingScan, Some(format!("pair code request failed: {e}")));
                }
            });
        }
        *slot = Some(Live {
            client,
            commands,
            supervisor,
            pump_stop,
            pump,
        });
        Ok(())
    }

    /// Stops a generation: disconnects, waits for its loop, stops its pump.
    async fn teardown(&self, live: Live) {
        let (tx, rx) = oneshot::channel();
        if live.commands.send(Command::Stop(tx)).is_ok() {
            let _ = tokio::time::timeout(STOP_WAIT + Duration::from_secs(1), rx).await;
        }
        // Whatever wa-rs changed last reaches the disk before the process may exit.
        let pm = live.client.persistence_manager();
        let snapshot = pm.get_device_snapshot().await;
        if let Err(e) = pm.backend().save(&snapshot.to_serializable()).await {
            debug!(error = %e, "final save of the device state failed");
        }
        live.pump_stop.cancel();
        let _ = tokio::time::timeout(STOP_WAIT, live.pump).await;
        let _ = tokio::time::timeout(STOP_WAIT, live.supervisor).await;
    }

    async fn request_pair_code(&self, client: &Arc<wa_rs::Client>, phone: &PhoneNumber) -> Result<String, EngineError> {
        client
            .wait_for_socket(SOCKET_WAIT)
            .await
            .map_err(|_| EngineError::NotConnected("no connection to WhatsApp yet; try again shortly".into()))?;
        if client.is_logged_in() {
            return Err(EngineError::AlreadyPaired);
        }
        let options = wa_rs::pair_code::PairCodeOptions {
            phone_number: phone.digits().to_owned(),
            ..Default::default()
        };
        client
            .pair_with_code(options)
            .await
            .map_err(|e| EngineError::Rejected(format!("pair code request: {e}")))
    }

    /// Keeps wa-rs's run loop going and carries out restart and stop.
    async fn supervise(
        self: Arc<Self>,
        client: Arc<wa_rs::Client>,
        first_run: JoinHandle<()>,
        mut commands: mpsc::UnboundedReceiver<Command>,
    ) {
        let spawn_run = |c: &Arc<wa_rs::Client>| {
            let c = c.clone();
            c.enable_auto_reconnect.store(true, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move { c.run().await })
        };
        let mut run = first_run;
        let mut pause = RERUN_MIN;
        loop {
            tokio::select! {
                _ = &mut run => {
                    if self.logging_out.load(std::sync::atomic::Ordering::SeqCst) {
                        return;
                    }
                    if !client.enable_auto_reconnect.load(std::sync::atomic::Ordering::SeqCst) {
                        // wa-rs gave up (replaced, banned, outdated, logged out): the status
                        // says why; only a restart or stop moves on from here.
                        match commands.recv().await {
                            Some(Command::Restart) => run = spawn_run(&client),
                            Some(Command::Stop(done)) => { let _ = done.send(()); return; }
                            None => return,
                        }
                        continue;
                    }
                    // The run loop ended by itself, e.g. every QR code of a pairing expired:
                    // connect again for new ones.
                    debug!(pause_ms = pause.as_millis() as u64, "run loop ended; starting it again");
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        cmd = commands.recv() => match cmd {
                            Some(Command::Restart) => {}
                            Some(Command::Stop(done)) => { let _ = done.send(()); return; }
                            None => return,
                        },
                    }
                    pause = (pause * 2).min(RERUN_MAX);
                    run = spawn_run(&client);
                }
                cmd = commands.recv() => match cmd {
                    Some(Command::Restart) => {
                        client.disconnect().await;
                        let _ = tokio::time::timeout(STOP_WAIT, &mut run).await;
                        pause = RERUN_MIN;
                        run = spawn_run(&client);
                    }
                    Some(Command::Stop(done)) => {
                        client.disconnect().await;
                        let _ = tokio::time::timeout(STOP_WAIT, &mut run).await;
                        let _ = done.send(());
                        return;
                    }
                    None => {
                        client.disconnect().await;
                        return;
                    }
                },
            }
        }
    }

    /// Takes wa-rs events in order and acts on them.
    async fn pump(self: Arc<Self>, client: Arc<wa_rs::Client>, mut events: mpsc::UnboundedReceiver<Event>, stop: CancellationToken) {
        let mut last_progress = Instant::now();
        let mut warned_slow = false;
        let mut tick = tokio::time::interval((self.opts.slow_connect / 4).max(Duration::from_millis(100)));
        loop {
            let event = tokio::select! {
                () = stop.cancelled() => return,
                e = events.recv() => match e { Some(e) => e, None => return },
                _ = tick.tick() => {
                    self.check_slow_connect(&mut last_progress, &mut warned_slow);
                    continue;
                }
            };
            if self.logging_out.load(std::sync::atomic::Ordering::SeqCst) {
                continue;
            }
            let steps = events::translate(&event, &mut self.track(), Utc::now());
            if !steps.is_empty() {
                last_progress = Instant::now();
                warned_slow = false;
            }
            for step in steps {
                match step {
                    Step::Emit(e) => self.emit(e),
                    Step::Inbound(msg, info) => {
                        if let Some(m) = self.inbound(&client, &msg, &info).await {
                            self.emit(EngineEvent::Inbound(m));
                        }
                    }
                    Step::LoggedOut(reason) => {
                        // Wipe from outside this generation's tasks: the teardown waits for them.
                        let core = self.clone();
                        tokio::spawn(async move { core.finish_logout(reason, None).await });
                    }
                }
            }
        }
    }

    /// Says so when a connection takes unusually long (wa-rs reports no failed attempts).
    fn check_slow_connect(&self, last_progress: &mut Instant, warned: &mut bool) {
        let mut track = self.track();
        let connecting = matches!(track.phase, Phase::Starting | Phase::Reconnecting);
        if !connecting {
            *last_progress = Instant::now();
            return;
        }
        if !*warned && last_progress.elapsed() >= self.opts.slow_connect {
            *warned = true;
            let phase = if track.is_paired() { Phase::Reconnecting } else { Phase::Starting };
            let reason = format!(
                "no connection to WhatsApp after {} s; still retrying",
                last_progress.elapsed().as_secs()
            );
            if let Some(Step::Emit(e)) = track.state(phase, Some(reason)) {
                drop(track);
                self.emit(e);
            }
        }
    }

    /// Builds the inbound event, fetching media under the cap.
    async fn inbound(
        &self,
        client: &Arc<wa_rs::Client>,
        msg: &wa_rs::wa_rs_proto::whatsapp::Message,
        info: &wa_rs::types::message::MessageInfo,
    ) -> Option<wa_api::pod::InboundMessage> {
        let draft = inbound::draft(msg, info)?;
        let mut message = draft.message;
        let (Some(fetch), Some(media)) = (draft.fetch, message.media.as_mut()) else {
            return Some(message);
        };
        let declared = fetch.declared_length().unwrap_or(0);
        if declared > self.ctx.media_max_bytes as u64 {
            debug!(id = %message.message_id, declared, "inbound media over the cap; not downloaded");
            return Some(message);
        }
        match tokio::time::timeout(self.opts.send_timeout, client.download(fetch.downloadable())).await {
            Ok(Ok(bytes)) if bytes.len() <= self.ctx.media_max_bytes => {
                media.size = bytes.len() as u64;
                media.sha256 = hex::encode(Sha256::digest(&bytes));
                media.data = Some(base64::engine::general_purpose::STANDARD.encode(&bytes));
            }
            Ok(Ok(bytes)) => debug!(id = %message.message_id, size = bytes.len(), "inbound media over the cap"),
            Ok(Err(e)) => warn!(id = %message.message_id, error = %e, "inbound media download failed"),
            Err(_) => warn!(id = %message.message_id, "inbound media download timed out"),
        }
        Some(message)
    }

    /// Ends a generation for good: stop it, wipe the store, report `LoggedOut`.
    async fn finish_logout(self: Arc<Self>, reason: String, held: Option<&mut Option<Live>>) {
        self.logging_out.store(true, std::sync::atomic::Ordering::SeqCst);
        let live = match held {
            Some(slot) => slot.take(),
            None => self.live.lock().await.take(),
        };
        if let Some(live) = live {
            self.teardown(live).await;
        }
        let data_dir = self.ctx.data_dir.clone();
        let wiped = tokio::task::spawn_blocking(move || store::wipe(&data_dir)).await;
        let reason = match wiped {
            Ok(Ok(())) => reason,
            Ok(Err(e)) => format!("{reason}; the auth store could not be removed: {e}"),
            Err(e) => format!("{reason}; the auth store could not be removed: {e}"),
        };
        info!(%reason, "logged out; auth state wiped");
        self.on_whatsapp.lock().unwrap_or_else(|p| p.into_inner()).clear();
        let mut track = self.track();
        track.account = None;
        let step = track.state(Phase::LoggedOut, Some(reason));
        drop(track);
        if let Some(Step::Emit(e)) = step {
            self.emit(e);
        }
    }

    /// Checks once per recipient that the number has WhatsApp, for a clear error instead of a
    /// message that silently goes nowhere.
    async fn check_recipient(&self, client: &wa_rs::Client, to: &Recipient) -> Result<(), EngineError> {
        // Phone-number users only: LIDs, groups and broadcasts have no number to look up.
        let digits = match to {
            Recipient::Phone(p) => p.digits().to_owned(),
            Recipient::Jid(j) if j.server == wa_api::ids::JidServer::User => j.user.clone(),
            Recipient::Jid(_) => return Ok(()),
        };
        let phone = format!("+{digits}");
        if self.on_whatsapp.lock().unwrap_or_else(|p| p.into_inner()).contains(&digits) {
            return Ok(());
        }
        let registered = is_on_whatsapp(client, &digits)
            .await
            .map_err(|e| EngineError::Rejected(format!("cannot look up {phone}: {e}")))?;
        if !registered {
            return Err(EngineError::NotOnWhatsapp(phone));
        }
        let mut known = self.on_whatsapp.lock().unwrap_or_else(|p| p.into_inner());
        if known.len() >= KNOWN_RECIPIENTS {
            known.clear();
        }
        known.insert(digits);
        Ok(())
    }

    async fn send(&self, client: &Arc<wa_rs::Client>, msg: &OutgoingMessage) -> Result<SentMessage, EngineError> {
        self.check_recipient(client, &msg.to).await?;
        let chat = msg.to.to_jid();
        let to: wa_rs::Jid = chat
            .to_string()
            .parse()
            .map_err(|e| EngineError::Refused(format!("cannot address {chat}: {e}")))?;
        let reply_to = msg.reply_to.as_deref();
        let message = match &msg.content {
            Content::Text(t) => outgoing::text(t, reply_to),
            Content::Media(m) => {
                let up = client
                    .upload(m.data.clone(), outgoing::media_type(m.kind))
                    .await
                    .map_err(|e| EngineError::Rejected(format!("media upload failed: {e}")))?;
                outgoing::media(m, &up, reply_to, Utc::now().timestamp())
            }
        };
        let id = client
            .send_message(to, message)
            .await
            .map_err(|e| EngineError::Rejected(e.to_string()))?;
        Ok(SentMessage {
            id,
            chat,
            timestamp: Utc::now(),
        })
    }
}

/// Hands wa-rs events to the pump, in dispatch order.
struct Forwarder(mpsc::UnboundedSender<Event>);

impl EventHandler for Forwarder {
    fn handle_event(&self, event: &Event) {
        let _ = self.0.send(event.clone());
    }
}

/// wa-rs takes its HTTP client by value; the engine keeps its own handle to it.
struct HttpShim(Arc<EngineHttp>);

#[async_trait]
impl wa_rs::http::HttpClient for HttpShim {
    async fn execute(&self, request: wa_rs::http::HttpRequest) -> anyhow::Result<wa_rs::http::HttpResponse> {
        self.0.execute(request).await
    }
}

fn not_connected(phase: Phase) -> EngineError {
    EngineError::NotConnected(format!("the session is {phase}"))
}

#[async_trait]
impl Engine for WhatsAppEngine {
    fn kind(&self) -> wa_api::Engine {
        wa_api::Engine::Whatsapp
    }

    async fn start(&self, phone: Option<PhoneNumber>) -> Result<(), EngineError> {
        let mut live = self.core.live.lock().await;
        match live.as_ref() {
            None => self.core.launch(&mut live, phone).await,
            // wa-rs gave up (another client took over, a ban, an outdated version): the
            // session starts us again after `Failed`, so connect again.
            Some(l) if self.core.track().phase == Phase::Failed => {
                self.core.set_state(Phase::Starting, Some("starting again after a failure".into()));
                l.commands
                    .send(Command::Restart)
                    .map_err(|_| EngineError::Internal(anyhow::anyhow!("the connection supervisor is gone")))
            }
            Some(_) => Ok(()),
        }
    }

    async fn pair_code(&self, phone: &PhoneNumber) -> Result<String, EngineError> {
        if self.core.track().is_paired() {
            return Err(EngineError::AlreadyPaired);
        }
        let client = {
            let mut live = self.core.live.lock().await;
            if live.is_none() {
                // Logged out: pairing again starts a fresh store.
                self.core.launch(&mut live, None).await?;
            }
            live.as_ref().map(|l| l.client.clone())
        };
        let client = client.ok_or_else(|| not_connected(self.core.track().phase))?;
        self.core.request_pair_code(&client, phone).await
    }

    async fn send(&self, msg: &OutgoingMessage) -> Result<SentMessage, EngineError> {
        let phase = self.core.track().phase;
        if phase != Phase::Connected {
            return Err(not_connected(phase));
        }
        let client = self
            .core
            .live
            .lock()
            .await
            .as_ref()
            .map(|l| l.client.clone())
            .ok_or_else(|| not_connected(phase))?;
        let timeout = self.core.opts.send_timeout;
        match tokio::time::timeout(timeout, self.core.send(&client, msg)).await {
            Ok(r) => r,
            Err(_) => Err(EngineError::Timeout(format!("the send took longer than {} s", timeout.as_secs()))),
        }
    }

    async fn logout(&self) -> Result<(), EngineError> {
        let mut live = self.core.live.lock().await;
        let phase = self.core.track().phase;
        if phase == Phase::LoggedOut && live.is_none() {
            return Ok(());
        }
        let mut reason = "logged out by request".to_owned();
        let connected = live.as_ref().map(|l| l.client.clone()).filter(|c| c.is_logged_in());
        self.core.logging_out.store(true, std::sync::atomic::Ordering::SeqCst);
        match connected {
            Some(client) => {
                if let Err(e) = unlink(&client).await {
                    warn!(error = %e, "WhatsApp did not confirm the unlink");
                    reason = format!("logged out here; WhatsApp did not confirm the unlink ({e}), remove the device on the phone");
                }
            }
            None if self.core.track().is_paired() => {
                reason = "logged out here while offline; remove the device on the phone (Linked devices)".into();
            }
            None => {}
        }
        self.core.clone().finish_logout(reason, Some(&mut *live)).await;
        Ok(())
    }

    async fn restart(&self) -> Result<(), EngineError> {
        let mut live = self.core.live.lock().await;
        match live.as_ref() {
            Some(l) => {
                if self.core.track().is_paired() {
                    self.core.set_state(Phase::Reconnecting, Some("restart requested".into()));
                }
                l.commands
                    .send(Command::Restart)
                    .map_err(|_| EngineError::Internal(anyhow::anyhow!("the connection supervisor is gone")))
            }
            // Logged out (or never started): pair again with a fresh store.
            None => self.core.launch(&mut live, None).await,
        }
    }

    async fn shutdown(&self) {
        let live = self.core.live.lock().await.take();
        if let Some(live) = live {
            self.core.teardown(live).await;
        }
    }
}

/// Asks WhatsApp (usync, contact query) whether a number has an account.
///
/// wa-rs 0.2's `contacts().is_on_whatsapp` reads the answer's `jid` attribute as a string, but
/// WhatsApp encodes it as a binary JID, so that call never finds anyone; this reads it as a JID.
async fn is_on_whatsapp(client: &wa_rs::Client, digits: &str) -> anyhow::Result<bool> {
    use wa_rs::NodeBuilder;
    let usync = NodeBuilder::new("usync")
        .attrs([
            ("sid", format!("{}", rand::random::<u32>())),
            ("mode", "query".into()),
            ("last", "true".into()),
            ("index", "0".into()),
            ("context", "interactive".into()),
        ])
        .children([
            NodeBuilder::new("query").children([NodeBuilder::new("contact").build()]).build(),
            NodeBuilder::new("list")
                .children([NodeBuilder::new("user")
                    .children([NodeBuilder::new("contact").string_content(format!("+{digits}")).build()])
                    .build()])
                .build(),
        ])
        .build();
    let content = NodeBuilder::new("iq").children([usync]).build().content;
    let query = wa_rs::request::InfoQuery::get("usync", wa_rs::jid_utils::server_jid(), content);
    let resp = client.send_iq(query).await?;
    let Some(list) = resp.get_optional_child_by_tag(&["usync", "list"]) else {
        anyhow::bail!("usync answer has no list");
    };
    Ok(list.get_children_by_tag("user").any(|u| {
        let jid = u.attrs().optional_jid("jid");
        let in_ = u
            .get_optional_child("contact")
            .is_some_and(|c| c.attrs().optional_string("type") == Some("in"));
        in_ && jid.is_some_and(|j| j.user == digits)
    }))
}

/// Sends `remove-companion-device` for our own device and waits for the answer.
async fn unlink(client: &Arc<wa_rs::Client>) -> anyhow::Result<()> {
    let own = client.get_pn().await.ok_or_else(|| anyhow::anyhow!("no own JID"))?;
    let request = wa_rs::NodeBuilder::new("remove-companion-device")
        .attrs([("jid", own.to_string()), ("reason", "user_initiated".to_owned())])
        .build();
    // The query takes the request as node content; a wrapper node hands it over.
    let content = wa_rs::NodeBuilder::new("iq").children([request]).build().content;
    let query = wa_rs::request::InfoQuery::set("md", wa_rs::jid_utils::server_jid(), content).with_timeout(UNLINK_TIMEOUT);
    client.send_iq(query).await?;
    Ok(())
}

impl Drop for WhatsAppEngine {
    fn drop(&mut self) {
        // A last resort when shutdown was not called: stop the connection task.
        if let Ok(mut live) = self.core.live.try_lock()
            && let Some(l) = live.take()
        {
            let (tx, _) = oneshot::channel();
            let _ = l.commands.send(Command::Stop(tx));
            l.pump_stop.cancel();
        }
    }
}

