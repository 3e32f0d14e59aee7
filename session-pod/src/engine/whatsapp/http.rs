//! The engine's HTTP client for wa-rs: media upload and download, and the daily check of
//! WhatsApp Web's version. With a media URL configured, every HTTPS host the engine would
//! contact is replaced by that base URL (tests point it at the protocol emulator).

use std::time::Duration;

use anyhow::{Context, bail};
use wa_rs::http::{HttpClient, HttpRequest, HttpResponse};

pub struct EngineHttp {
    client: reqwest::Client,
    /// `http://127.0.0.1:1234` in tests; `None` in production.
    rewrite_base: Option<String>,
    /// Bodies larger than this are refused (media cap plus encryption overhead).
    max_body: usize,
}

impl EngineHttp {
    pub fn new(rewrite_base: Option<String>, max_body: usize) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(120))
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Self {
            client,
            rewrite_base: rewrite_base.map(|b| b.trim_end_matches('/').to_owned()),
            max_body,
        })
    }
}

/// `https://host/path?q` → `<base>/path?q` when a base is set.
pub fn rewrite(url: &str, base: Option<&str>) -> String {
    let Some(base) = base else {
        return url.to_owned();
    };
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .unwrap_or(url);
    let path = rest.find('/').map_or("/", |i| &rest[i..]);
    format!("{base}{path}")
}

#[async_trait::async_trait]
impl HttpClient for EngineHttp {
    async fn execute(&self, request: HttpRequest) -> anyhow::Result<HttpResponse> {
        let url = rewrite(&request.url, self.rewrite_base.as_deref());
        let mut req = match request.method.as_str() {
            "GET" => self.client.get(&url),
            "POST" => self.client.post(&url),
            other => bail!("unsupported HTTP method {other}"),
        };
        for (k, v) in &request.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        if let Some(body) = request.body {
            req = req.body(body);
        }
        let mut resp = req.send().await.with_context(|| format!("{} {}", request.method, strip_query(&url)))?;
        let status_code = resp.status().as_u16();
        if resp.content_length().is_some_and(|n| n > self.max_body as u64) {
            bail!("response of {} is larger than {} bytes", strip_query(&url), self.max_body);
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await? {
            if body.len() + chunk.len() > self.max_body {
                bail!("response of {} is larger than {} bytes", strip_query(&url), self.max_body);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(HttpResponse { status_code, body })
    }
}

/// URLs carry auth tokens in their query; keep them out of errors and logs.
fn strip_query(url: &str) -> &str {
    url.split('?').next().unwrap_or(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_only_with_a_base() {
        let check = |url: &str, base: Option<&str>, want: &str| assert_eq!(rewrite(url, base), want, "{url}");
        check("https://mmg.whatsapp.net/mms/image/TOK?auth=a&token=b", None, "https://mmg.whatsapp.net/mms/image/TOK?auth=a&token=b");
        check("https://mmg.whatsapp.net/mms/image/TOK?auth=a", Some("http://127.0.0.1:9"), "http://127.0.0.1:9/mms/image/TOK?auth=a");
        check("https://web.whatsapp.com/sw.js", Some("http://127.0.0.1:9"), "http://127.0.0.1:9/sw.js");
        check("https://host", Some("http://e"), "http://e/");
        assert_eq!(strip_query("https://h/p?auth=secret"), "https://h/p");
    }

    #[tokio::test]
    async fn oversized_bodies_are_refused() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let body = vec![b'x'; 100];
                let _ = s
                    .write_all(format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len()).as_bytes())
                    .await;
                let _ = s.write_all(&body).await;
            }
        });
        let base = Some(format!("http://{addr}"));
        let small = EngineHttp::new(base.clone(), 50).unwrap();
        let err = small.execute(HttpRequest::get("https://mmg.whatsapp.net/v/x?auth=secret")).await.unwrap_err();
        assert!(err.to_string().contains("larger than 50"), "{err}");
        assert!(!err.to_string().contains("secret"));
        let big = EngineHttp::new(base, 1000).unwrap();
        let ok = big.execute(HttpRequest::get("https://mmg.whatsapp.net/v/x")).await.unwrap();
        assert_eq!((ok.status_code, ok.body.len()), (200, 100));
    }
}
