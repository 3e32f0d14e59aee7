//! Webhooks: deliveries a test HTTP server receives and verifies (HMAC-SHA256 over timestamp
//! and body), retries while the receiver is down, dead-lettering after the last attempt,
//! the delivery log, redelivery.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::both;
use crate::common::*;

both!(webhooks_signed_retried_dead_lettered, webhooks);
async fn webhooks(kind: DbKind) {
    let (_dir, _db, gw) = setup(kind, &Options::default());
    gw.connected_session("w", json!({})).await;
    let good = Sink::start(200).await;
    let bad = Sink::start(500).await;

    const SECRET: &str = "0123456789abcdef-secret";
    let (status, hook) = gw
        .call(Method::POST, "/v1/sessions/w/webhooks", Some(json!({"url": good.url, "events": ["message", "receipt"], "secret": SECRET})))
        .await;
    assert_eq!(status, 201, "{hook}");
    assert_eq!(hook["secret"], SECRET);
    let good_id = hook["id"].as_str().unwrap().to_owned();
    let (status, hook) = gw.call(Method::POST, "/v1/sessions/w/webhooks", Some(json!({"url": bad.url, "events": ["message"]}))).await;
    assert_eq!(status, 201);
    assert!(hook["secret"].as_str().unwrap().starts_with("whsec_"), "a secret is generated");
    let bad_id = hook["id"].as_str().unwrap().to_owned();

    for (body, what) in [
        (json!({"url": "ftp://example.com/x"}), "scheme"),
        (json!({"url": "not a url"}), "url"),
        (json!({"url": good.url, "secret": "short"}), "secret"),
    ] {
        let (status, resp) = gw.call(Method::POST, "/v1/sessions/w/webhooks", Some(body)).await;
        assert_eq!((status, resp["error"]["code"].as_str()), (422, Some("VALIDATION_FAILED")), "{what}");
    }
    let (_, list) = gw.call(Method::GET, "/v1/sessions/w/webhooks", None).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 2);
    assert!(!list.to_string().contains(SECRET), "secrets are not listed");
    let (status, body) = gw.call(Method::GET, "/v1/sessions/w/webhooks/nope", None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("WEBHOOK_NOT_FOUND")));

    // An inbound message reaches the receiver, signed.
    let (status, _) = gw.call(Method::POST, "/v1/sessions/w/sandbox/inbound", Some(json!({"from": "+15550003333", "text": "ping"}))).await;
    assert_eq!(status, 200);
    let got = good.wait_for(1).await;
    let first = &got[0];
    let signature = first.headers["x-wa-signature"].to_str().unwrap();
    let now = chrono::Utc::now().timestamp();
    assert!(wa_gateway::delivery::verify(SECRET, signature, &first.body, now, 300), "signature does not verify: {signature}");
    assert!(!wa_gateway::delivery::verify("another-secret-000", signature, &first.body, now, 300));
    assert!(!wa_gateway::delivery::verify(SECRET, signature, &first.body, now + 301, 300), "a replay after 5 minutes must fail");
    // Check it independently of the gateway's own code, too.
    let (t, v1) = parse_signature(signature);
    assert_eq!(v1, hmac_hex(SECRET, &format!("{t}.{}", String::from_utf8_lossy(&first.body))));
    let payload: Value = serde_json::from_slice(&first.body).unwrap();
    assert_eq!((payload["type"].as_str(), payload["session"].as_str()), (Some("message"), Some("w")));
    assert_eq!(payload["data"]["text"], "ping");
    assert_eq!(first.headers["x-wa-event"], "message");
    assert_eq!(first.headers["x-wa-event-id"].to_str().unwrap(), payload["id"].as_str().unwrap());

    // A send's receipts go to the hook that asked for receipts.
    let (status, m) = gw.call(Method::POST, "/v1/sessions/w/messages", Some(json!({"to": "+15551234567", "type": "text", "text": "x"}))).await;
    assert_eq!(status, 201);
    let mut receipts = Vec::new();
    for _ in 0..200 {
        receipts = good
            .all()
            .iter()
            .map(|r| serde_json::from_slice::<Value>(&r.body).unwrap())
            .filter(|p| p["type"] == "receipt" && p["data"]["messageId"] == m["id"])
            .collect();
        if receipts.iter().any(|p| p["data"]["status"] == "read") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(receipts.iter().any(|p| p["data"]["status"] == "read"), "{receipts:?}");

    // The failing receiver: three attempts, then dead-lettered and visible in the log.
    let mut log = Value::Null;
    for _ in 0..200 {
        let (_, l) = gw.call(Method::GET, &format!("/v1/sessions/w/webhooks/{bad_id}/deliveries"), None).await;
        if l["items"][0]["status"] == "dead" {
            log = l;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dead = &log["items"][0];
    assert_eq!((dead["status"].as_str(), dead["attempts"].as_u64(), dead["lastStatus"].as_u64()), (Some("dead"), Some(3), Some(500)), "{log}");
    assert_eq!(bad.all().len(), 3);
    // Fixed receiver, redelivered by hand.
    bad.set_status(204);
    let delivery_id = dead["id"].as_str().unwrap();
    let (status, d) = gw.call(Method::POST, &format!("/v1/sessions/w/webhooks/{bad_id}/deliveries/{delivery_id}/redeliver"), None).await;
    assert_eq!((status, d["status"].as_str()), (200, Some("pending")));
    bad.wait_for(4).await;

    // A receiver that is down for a while gets the delivery once it is back.
    good.set_status(503);
    let before = good.all().len();
    gw.call(Method::POST, "/v1/sessions/w/sandbox/inbound", Some(json!({"from": "+15550003333", "text": "while down"}))).await;
    good.wait_for(before + 1).await;
    good.set_status(200);
    let mut delivered = false;
    for _ in 0..200 {
        let (_, l) = gw.call(Method::GET, &format!("/v1/sessions/w/webhooks/{good_id}/deliveries?limit=200"), None).await;
        delivered = l["items"].as_array().unwrap().iter().any(|d| d["payload"]["data"]["text"] == "while down" && d["status"] == "delivered" && d["attempts"].as_u64() >= Some(2));
        if delivered {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(delivered, "the delivery was not retried to success");
    assert!(gw.metric("wa_gateway_webhook_deliveries_total{result=\"dead\"}").await.unwrap() >= 1.0);

    let (status, _) = gw.call(Method::DELETE, &format!("/v1/sessions/w/webhooks/{bad_id}"), None).await;
    assert_eq!(status, 204);
    let (status, _) = gw.call(Method::GET, &format!("/v1/sessions/w/webhooks/{bad_id}/deliveries"), None).await;
    assert_eq!(status, 404);
}

/// Sets a flag's value in the options (the gateway refuses a flag given twice).
fn set_flag(opts: &mut Options, flag: &str, value: &str) {
    match opts.args.iter().position(|a| a == flag) {
        Some(i) => opts.args[i + 1] = value.to_owned(),
        None => opts.args.extend([flag.to_owned(), value.to_owned()]),
    }
}

// A receiver that is down (nothing listens on its port) for a while: every delivery is
// retried, and once it is back each event arrives exactly once. Another receiver never comes
// back: after the last attempt its deliveries are dead-lettered and visible in the log and
// the metrics.
both!(webhook_receiver_down_then_back, receiver_down);
async fn receiver_down(kind: DbKind) {
    const EVENTS: usize = 10;
    const ATTEMPTS: u64 = 6;
    let mut opts = Options::default();
    set_flag(&mut opts, "--webhook-max-attempts", &ATTEMPTS.to_string());
    set_flag(&mut opts, "--webhook-backoff-ms", "100");
    let (_dir, _db, gw) = setup(kind, &opts);
    gw.connected_session("wd", json!({})).await;
    // Two ports where nothing listens (yet).
    let (flaky_port, gone_port) = {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        (a.local_addr().unwrap().port(), b.local_addr().unwrap().port())
    };
    let mut hooks = Vec::new();
    for port in [flaky_port, gone_port] {
        let (status, hook) = gw
            .call(Method::POST, "/v1/sessions/wd/webhooks", Some(json!({"url": format!("http://127.0.0.1:{port}/hook"), "events": ["message"]})))
            .await;
        assert_eq!(status, 201, "{hook}");
        hooks.push(hook["id"].as_str().unwrap().to_owned());
    }
    let (flaky, gone) = (&hooks[0], &hooks[1]);
    let started = std::time::Instant::now();
    for i in 0..EVENTS {
        let (status, _) = gw.call(Method::POST, "/v1/sessions/wd/sandbox/inbound", Some(json!({"from": "+15550004444", "text": format!("down {i}")}))).await;
        assert_eq!(status, 200);
    }
    let log_of = |hook: String| {
        let gw = &gw;
        async move {
            let (status, l) = gw.call(Method::GET, &format!("/v1/sessions/wd/webhooks/{hook}/deliveries?limit=200"), None).await;
            assert_eq!(status, 200, "{l}");
            l["items"].as_array().unwrap().clone()
        }
    };
    // The receiver stays down until every delivery failed three times.
    for _ in 0..300 {
        let items = log_of(flaky.clone()).await;
        if items.len() == EVENTS && items.iter().all(|d| d["attempts"].as_u64() >= Some(3)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let items = log_of(flaky.clone()).await;
    assert!(items.len() == EVENTS && items.iter().all(|d| d["attempts"].as_u64() >= Some(3) && d["status"] == "pending"), "{items:?}");
    assert!(items.iter().all(|d| d["lastError"].as_str().is_some_and(|e| e.contains("connection refused"))), "{items:?}");
    let sink = Sink::start_on(&format!("127.0.0.1:{flaky_port}"), 200).await;
    let back = std::time::Instant::now();
    sink.wait_for(EVENTS).await;
    let delivered_after = back.elapsed();
    // Every delivery is marked delivered, and no event arrives twice.
    for _ in 0..300 {
        if log_of(flaky.clone()).await.iter().all(|d| d["status"] == "delivered") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let items = log_of(flaky.clone()).await;
    assert!(items.iter().all(|d| d["status"] == "delivered" && d["attempts"].as_u64() < Some(ATTEMPTS + 1)), "{items:?}");
    let max_attempts = items.iter().filter_map(|d| d["attempts"].as_u64()).max().unwrap();

    // The receiver that never comes back: dead after the last attempt, with the reason.
    let mut dead = Vec::new();
    for _ in 0..400 {
        dead = log_of(gone.clone()).await;
        if dead.len() == EVENTS && dead.iter().all(|d| d["status"] == "dead") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(dead.len() == EVENTS && dead.iter().all(|d| d["status"] == "dead"), "{dead:?}");
    for d in &dead {
        assert_eq!(d["attempts"].as_u64(), Some(ATTEMPTS), "{d}");
        assert!(d["lastError"].as_str().is_some_and(|e| e.contains("connection refused") && e.contains("after 6 attempts")), "{d}");
    }
    let dead_after = started.elapsed();
    // Nothing more arrives at the receiver that came back (waited for longer than the last
    // retry delay).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let got = sink.all();
    let mut ids: Vec<String> = got.iter().map(|r| r.headers["x-wa-event-id"].to_str().unwrap().to_owned()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!((got.len(), ids.len()), (EVENTS, EVENTS), "each event exactly once");
    let expected: std::collections::BTreeSet<String> = items.iter().map(|d| d["eventId"].as_str().unwrap().to_owned()).collect();
    assert_eq!(ids.into_iter().collect::<std::collections::BTreeSet<_>>(), expected);
    assert!(gw.metric("wa_gateway_webhook_deliveries_total{result=\"dead\"}").await.unwrap() >= EVENTS as f64);
    println!(
        "FIGURES webhook_receiver_down_then_back/{kind:?}: {EVENTS} events to 2 receivers; the one back after 3 failed attempts got all {EVENTS} exactly once {delivered_after:?} after it returned (at most {max_attempts} attempts); the one never back: {EVENTS} dead after {ATTEMPTS} attempts, {dead_after:?} after the events"
    );
}

fn parse_signature(h: &str) -> (String, String) {
    let mut t = String::new();
    let mut v1 = String::new();
    for part in h.split(',') {
        if let Some(x) = part.strip_prefix("t=") {
            t = x.to_owned();
        }
        if let Some(x) = part.strip_prefix("v1=") {
            v1 = x.to_owned();
        }
    }
    (t, v1)
}

fn hmac_hex(secret: &str, message: &str) -> String {
    use hmac::{Hmac, Mac};
    let mut m = <Hmac<sha2::Sha256> as Mac>::new_from_slice(secret.as_bytes()).unwrap();
    m.update(message.as_bytes());
    hex::encode(m.finalize().into_bytes())
}
