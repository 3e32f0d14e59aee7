//! A bare wa-rs client pointed at an emulator, for the emulator's own tests.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use wa_rs::bot::Bot;
use wa_rs::store::SqliteStore;
use wa_rs::transport::TokioWebSocketTransportFactory;
use wa_rs::types::events::Event;

pub const STEP: Duration = Duration::from_secs(20);

/// Sends every HTTPS request of the client to the emulator instead.
pub struct ToEmulator {
    base: String,
    http: reqwest::Client,
}

#[async_trait::async_trait]
impl wa_rs::http::HttpClient for ToEmulator {
    async fn execute(&self, req: wa_rs::http::HttpRequest) -> anyhow::Result<wa_rs::http::HttpResponse> {
        let rest = req.url.strip_prefix("https://").unwrap_or(&req.url);
        let path = rest.find('/').map(|i| &rest[i..]).unwrap_or("/");
        let url = format!("{}{}", self.base, path);
        let mut r = match req.method.as_str() {
            "POST" => self.http.post(url),
            _ => self.http.get(url),
        };
        for (k, v) in &req.headers {
            r = r.header(k, v);
        }
        if let Some(b) = req.body {
            r = r.body(b);
        }
        let resp = r.send().await?;
        Ok(wa_rs::http::HttpResponse {
            status_code: resp.status().as_u16(),
            body: resp.bytes().await?.to_vec(),
        })
    }
}

pub struct Client {
    pub client: Arc<wa_rs::Client>,
    pub events: mpsc::UnboundedReceiver<Event>,
    run: tokio::task::JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.run.abort();
    }
}

pub async fn client(ws_url: &str, media_url: &str, db: &std::path::Path) -> Client {
    let backend = Arc::new(SqliteStore::new(db.to_str().unwrap()).await.unwrap());
    let (tx, events) = mpsc::unbounded_channel();
    let mut bot = Bot::builder()
        .with_backend(backend)
        .with_transport_factory(TokioWebSocketTransportFactory::new().with_url(ws_url))
        .with_http_client(ToEmulator {
            base: media_url.to_owned(),
            http: reqwest::Client::new(),
        })
        .skip_history_sync()
        .on_event(move |e, _| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(e);
            }
        })
        .build()
        .await
        .unwrap();
    let client = bot.client();
    let run = bot.run().await.unwrap();
    Client { client, events, run }
}

pub async fn next<T>(events: &mut mpsc::UnboundedReceiver<Event>, what: &str, f: impl Fn(&Event) -> Option<T>) -> T {
    let wait = async {
        while let Some(e) = events.recv().await {
            if let Some(v) = f(&e) {
                return v;
            }
        }
        panic!("event stream ended while waiting for {what}");
    };
    tokio::time::timeout(STEP, wait)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

