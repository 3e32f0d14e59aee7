//! The HTTP side: one listener serves the chat WebSocket (`/ws/chat`), the media host
//! (`/mms/…` uploads, `/v/…` downloads), the version file clients fetch (`/sw.js`) and the
//! control API (`/control/…`) that drives the simulated phones from other processes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State, WebSocketUpgrade};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::{Mutex, watch};

use crate::noise::ServerIdentity;
use crate::phone::{Outgoing, PhoneError, ReceiptKind};
use crate::world::World;

/// How the emulator behaves.
#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    /// Where to listen; port 0 picks a free one.
    pub listen: SocketAddr,
    /// Unknown phone numbers that clients look up become registered contacts (simulated
    /// phones), so tests can write to any number. Off: they are "not on WhatsApp".
    pub auto_register_contacts: bool,
    /// Contacts' phones confirm delivery of every message they decrypt, right away.
    pub auto_delivery_receipts: bool,
    /// The media host name handed out in `media_conn` (clients must be pointed at this
    /// emulator for it, as there is no DNS for it).
    pub media_host: String,
    /// The web client revision `/sw.js` announces.
    pub client_revision: u32,
    /// Largest upload accepted.
    pub max_upload_bytes: usize,
    /// Answer the queries a client makes right after login (A/B props, blocklist, privacy
    /// settings) with 501, as this emulator did before it implemented them. wa-rs logs those
    /// failures with their anyhow backtraces, which is how the memory benchmark shows what
    /// `RUST_BACKTRACE=1` costs a pod.
    pub refuse_init_queries: bool,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            auto_register_contacts: true,
            auto_delivery_receipts: true,
            media_host: "mmg.whatsapp.net".into(),
            client_revision: 1_031_424_117,
            max_upload_bytes: 64 * 1024 * 1024,
            refuse_init_queries: false,
        }
    }
}

/// State shared by connections, the control API and the in-process handle.
pub struct Shared {
    pub world: Mutex<World>,
    pub identity: ServerIdentity,
    pub config: EmulatorConfig,
    /// Bumped on every change, so waiters can sleep until something happens.
    pub changed: watch::Sender<u64>,
}

impl Shared {
    pub fn new(config: EmulatorConfig) -> Self {
        Self {
            world: Mutex::new(World::new()),
            identity: ServerIdentity::generate(),
            config,
            changed: watch::channel(0).0,
        }
    }

    pub fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }
}

pub fn router(shared: Arc<Shared>) -> Router {
    let max_upload = shared.config.max_upload_bytes;
    Router::new()
        .route("/ws/chat", get(ws_chat))
        .route("/sw.js", get(sw_js))
        .route("/mms/{kind}/{token}", post(upload))
        .route("/v/{*path}", get(download))
        .route("/control/health", get(|| async { "ok" }))
        .route("/control/accounts", get(accounts).post(register))
        .route("/control/accounts/{phone}", get(account))
        .route("/control/accounts/{phone}/messages", get(messages))
        .route("/control/accounts/{phone}/own-copies", get(own_copies))
        .route("/control/accounts/{phone}/send", post(send))
        .route("/control/accounts/{phone}/receipts", post(receipt))
        .route("/control/accounts/{phone}/unlink", post(unlink))
        .route("/control/accounts/{phone}/stream-error", post(stream_error))
        .route("/control/pairing", get(pairing))
        .route("/control/scan", post(scan))
        .route("/control/pair-code", post(pair_code))
        .route("/control/device-receipts/{id}", get(device_receipts))
        .layer(DefaultBodyLimit::max(max_upload))
        .with_state(shared)
}

async fn ws_chat(State(shared): State<Arc<Shared>>, ws: WebSocketUpgrade) -> Response {
    ws.max_message_size(crate::noise::MAX_FRAME + 16)
        .on_upgrade(move |socket| crate::conn::serve(shared, socket))
}

async fn sw_js(State(shared): State<Arc<Shared>>) -> Response {
    let body = format!(
        "self.__swData=JSON.parse(/*BTDS*/\"{{\\\"dynamic_data\\\":{{\\\"SiteData\\\":{{\\\"server_revision\\\":{r},\\\"client_revision\\\":{r}}}}}}}\");",
        r = shared.config.client_revision
    );
    ([(header::CONTENT_TYPE, "application/javascript")], body).into_response()
}

#[derive(Deserialize)]
struct UploadQuery {
    auth: Option<String>,
    token: Option<String>,
}

/// A media upload: the client names the blob by the base64url SHA-256 of its bytes.
async fn upload(
    State(shared): State<Arc<Shared>>,
    Path((kind, token)): Path<(String, String)>,
    Query(q): Query<UploadQuery>,
    body: Bytes,
) -> Response {
    if crate::media::MediaKind::from_mms_type(&kind).is_none() {
        return error(StatusCode::NOT_FOUND, "UNKNOWN_MEDIA_TYPE", &format!("no uploads of type {kind}"));
    }
    let mut world = shared.world.lock().await;
    if q.auth.as_deref() != Some(world.media_auth.as_str()) {
        return error(StatusCode::UNAUTHORIZED, "BAD_AUTH", "missing or wrong media auth token");
    }
    let hash = Sha256::digest(&body);
    let expected = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(hash);
    if token != expected || q.token.as_deref().is_some_and(|t| t != expected) {
        return error(StatusCode::BAD_REQUEST, "HASH_MISMATCH", "token is not the SHA-256 of the body");
    }
    let direct_path = format!("/v/t62.7118-24/{}.enc", hex::encode(&hash[..16]));
    world.blobs.insert(direct_path.clone(), body.to_vec());
    drop(world);
    shared.bump();
    let url = format!("https://{}{direct_path}?ccb=11-4", shared.config.media_host);
    axum::Json(json!({"url": url, "direct_path": format!("{direct_path}?ccb=11-4")})).into_response()
}

async fn download(State(shared): State<Arc<Shared>>, Path(path): Path<String>) -> Response {
    let key = format!("/v/{path}");
    match shared.world.lock().await.blobs.get(&key) {
        Some(b) => ([(header::CONTENT_TYPE, "application/octet-stream")], b.clone()).into_response(),
        None => error(StatusCode::NOT_FOUND, "NO_SUCH_MEDIA", "no upload at this path"),
    }
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, axum::Json(json!({"error": {"code": code, "message": message}}))).into_response()
}

impl IntoResponse for PhoneError {
    fn into_response(self) -> Response {
        let status = match &self {
            PhoneError::BadPhone(_) | PhoneError::BadRequest(_) | PhoneError::Link(_) => StatusCode::UNPROCESSABLE_ENTITY,
            PhoneError::UnknownAccount(_) | PhoneError::UnknownQr | PhoneError::NoPairCodeRequest(_) => StatusCode::NOT_FOUND,
            PhoneError::NoDevices(_) | PhoneError::LinkFailed(_) => StatusCode::CONFLICT,
            PhoneError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            PhoneError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        error(status, self.code(), &self.to_string())
    }
}

type ApiResult<T> = Result<axum::Json<T>, PhoneError>;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RegisterBody {
    phone: String,
    push_name: Option<String>,
}

async fn register(State(s): State<Arc<Shared>>, body: axum::Json<RegisterBody>) -> ApiResult<crate::phone::AccountInfo> {
    Ok(axum::Json(s.register(&body.phone, body.push_name.as_deref()).await?))
}

async fn accounts(State(s): State<Arc<Shared>>) -> axum::Json<Vec<crate::phone::AccountInfo>> {
    axum::Json(s.accounts().await)
}

async fn account(State(s): State<Arc<Shared>>, Path(phone): Path<String>) -> ApiResult<crate::phone::AccountInfo> {
    Ok(axum::Json(s.account(&phone).await?))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WaitQuery {
    /// Wait up to this many seconds (max 60) until at least `count` messages are there.
    wait_seconds: Option<u64>,
    count: Option<usize>,
}

async fn messages(
    State(s): State<Arc<Shared>>,
    Path(phone): Path<String>,
    Query(q): Query<WaitQuery>,
) -> ApiResult<Vec<crate::world::ReceivedMessage>> {
    let digits = crate::phone::digits(&phone)?;
    if let (Some(secs), Some(count)) = (q.wait_seconds, q.count) {
        s.wait_for(Duration::from_secs(secs.min(60)), |w| {
            (w.received.iter().filter(|m| m.to == digits && m.from != digits).count() >= count).then_some(())
        })
        .await;
    }
    Ok(axum::Json(s.received(&phone).await?))
}

async fn own_copies(State(s): State<Arc<Shared>>, Path(phone): Path<String>) -> ApiResult<Vec<crate::world::ReceivedMessage>> {
    Ok(axum::Json(s.own_copies(&phone).await?))
}

#[derive(Deserialize)]
struct SendBody {
    to: String,
    #[serde(flatten)]
    what: Outgoing,
}

async fn send(State(s): State<Arc<Shared>>, Path(from): Path<String>, body: axum::Json<SendBody>) -> ApiResult<serde_json::Value> {
    let id = s.send(&from, &body.to, &body.what).await?;
    Ok(axum::Json(json!({ "id": id })))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReceiptBody {
    to: String,
    message_id: String,
    #[serde(rename = "type")]
    kind: ReceiptKind,
}

async fn receipt(State(s): State<Arc<Shared>>, Path(from): Path<String>, body: axum::Json<ReceiptBody>) -> ApiResult<serde_json::Value> {
    s.receipt(&from, &body.to, &body.message_id, body.kind).await?;
    Ok(axum::Json(json!({})))
}

#[derive(Deserialize, Default)]
struct UnlinkBody {
    device: Option<u16>,
}

async fn unlink(
    State(s): State<Arc<Shared>>,
    Path(phone): Path<String>,
    body: Option<axum::Json<UnlinkBody>>,
) -> ApiResult<serde_json::Value> {
    let device = body.and_then(|b| b.0.device);
    let n = s.unlink(&phone, device).await?;
    Ok(axum::Json(json!({ "unlinked": n })))
}

#[derive(Deserialize, Default)]
struct StreamErrorBody {
    code: Option<String>,
}

async fn stream_error(
    State(s): State<Arc<Shared>>,
    Path(phone): Path<String>,
    body: Option<axum::Json<StreamErrorBody>>,
) -> ApiResult<serde_json::Value> {
    let code = body.and_then(|b| b.0.code).unwrap_or_else(|| "503".into());
    let n = s.stream_error(&phone, &code).await?;
    Ok(axum::Json(json!({ "closed": n })))
}

async fn pairing(State(s): State<Arc<Shared>>, Query(q): Query<WaitQuery>) -> axum::Json<Vec<crate::phone::PendingPairing>> {
    if let Some(secs) = q.wait_seconds {
        s.wait_for(Duration::from_secs(secs.min(60)), |w| {
            let p = crate::phone::pending(w);
            (!p.is_empty()).then_some(())
        })
        .await;
    }
    axum::Json(s.pending_pairings().await)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ScanBody {
    qr: String,
    phone: String,
    push_name: Option<String>,
}

async fn scan(State(s): State<Arc<Shared>>, body: axum::Json<ScanBody>) -> ApiResult<crate::phone::LinkedDevice> {
    Ok(axum::Json(s.scan(&body.qr, &body.phone, body.push_name.as_deref()).await?))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PairCodeBody {
    phone: String,
    code: String,
    push_name: Option<String>,
}

async fn pair_code(State(s): State<Arc<Shared>>, body: axum::Json<PairCodeBody>) -> ApiResult<crate::phone::LinkedDevice> {
    Ok(axum::Json(s.enter_pair_code(&body.phone, &body.code, body.push_name.as_deref()).await?))
}

async fn device_receipts(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> axum::Json<Vec<crate::world::DeviceReceipt>> {
    axum::Json(s.device_receipts(&id).await)
}
