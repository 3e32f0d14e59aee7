//! The in-flight limit (`--max-in-flight`): past it, API requests are refused at once with
//! 503 OVERLOADED and `Retry-After`, nothing is recorded for them, the admitted ones finish,
//! and probes, metrics and pod events still get through. A real gateway with a limit of 4:
//! four sends held in flight by a stopped session process, then more sends than the limit.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::both;
use crate::common::*;

const LIMIT: usize = 4;
const SHED: usize = 12;

fn options() -> Options {
    let mut opts = Options::default();
    // The held sends must outlive the pause below.
    if let Some(i) = opts.args.iter().position(|a| a == "--send-timeout-seconds") {
        opts.args[i + 1] = "30".into();
    }
    opts.args.extend(["--max-in-flight".into(), LIMIT.to_string()]);
    opts
}

fn text(i: usize) -> Value {
    json!({"to": "+15551234567", "type": "text", "text": format!("overload {i}")})
}

both!(sends_past_the_limit_are_refused_and_nothing_is_lost, past_the_limit);
async fn past_the_limit(kind: DbKind) {
    let (_dir, db, gw) = setup(kind, &options());
    gw.connected_session("o", json!({"rateLimit": {"messagesPerMinute": 6000, "burst": 100}})).await;
    let send = |key: String, i: usize| {
        gw.req(Method::POST, "/v1/sessions/o/messages", Some(ADMIN)).header("idempotency-key", key).json(&text(i)).send()
    };

    // Hold LIMIT sends in flight: the session process is stopped, so their forwards wait.
    let pod = gw.session_pid("o").expect("session pid");
    signal(pod, libc::SIGSTOP);
    let held: Vec<_> = (0..LIMIT).map(|i| tokio::spawn(send(format!("held-{i}"), i))).collect();
    let mut in_flight = 0.0;
    for _ in 0..300 {
        in_flight = gw.metric("wa_gateway_requests_in_flight").await.unwrap_or(0.0);
        if in_flight >= LIMIT as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(in_flight, LIMIT as f64, "the held sends never were in flight together\n{}", gw.log());

    // More than the limit: every one refused at once, in the error shape, with Retry-After.
    let shed = futures::future::join_all((0..SHED).map(|i| send(format!("shed-{i}"), 100 + i))).await;
    for resp in shed {
        let resp = resp.unwrap();
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], "OVERLOADED", "{body}");
    }
    // Other keyed routes are counted too; the compatible ones answer in their own shape.
    let (status, body) = gw.call(Method::GET, "/v1/sessions", None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (503, Some("OVERLOADED")), "{body}");
    let (status, body) = gw.call(Method::GET, "/api/v1/sessions/status/", None).await;
    assert_eq!((status, body["success"].as_bool(), body["error_code"].as_str()), (503, Some(false), Some("OVERLOADED")), "{body}");
    // Probes and metrics are not.
    let health = gw.http.get(format!("{}/healthz", gw.url)).send().await.unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(gw.metric("wa_gateway_requests_shed_total").await, Some((SHED + 2) as f64));

    // The held sends go through once the pod runs again.
    signal(pod, libc::SIGCONT);
    let mut ids = Vec::new();
    for h in held {
        let resp = h.await.unwrap().unwrap();
        assert_eq!(resp.status(), 201, "{}", gw.log());
        let body: Value = resp.json().await.unwrap();
        ids.push(body["id"].as_str().unwrap().to_owned());
    }

    // Nothing was recorded for the refused sends; each admitted one is recorded once and sent.
    let store = db.store().await;
    for i in 0..SHED {
        let row = store.message_by_idempotency_key("o", &format!("shed-{i}")).await.unwrap();
        assert!(row.is_none(), "a refused send was recorded: {row:?}");
    }
    for (i, id) in ids.iter().enumerate() {
        let row = store.message_by_idempotency_key("o", &format!("held-{i}")).await.unwrap().expect("held send recorded");
        assert_eq!(&row.id, id);
        gw.wait_message(id, "read", |m| m["status"] == "read").await;
    }
    assert_eq!(gw.metric("wa_gateway_requests_in_flight").await, Some(0.0));
    // The backlog (the limit reached, then drained) hands its memory back, once.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while gw.metric("wa_gateway_memory_trims_total").await != Some(1.0) {
        assert!(
            std::time::Instant::now() < deadline,
            "no memory trim after the backlog: {:?}",
            gw.metric("wa_gateway_memory_trims_total").await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A refused send retried later is sent, once.
    let resp = send("shed-0".into(), 100).await.unwrap();
    assert_eq!(resp.status(), 201);
    let (status, page) = gw.call(Method::GET, "/v1/sessions/o/messages?limit=50", None).await;
    assert_eq!(status, 200);
    assert_eq!(page["items"].as_array().map(Vec::len), Some(LIMIT + 1), "{page}");
    store.close().await;
}
