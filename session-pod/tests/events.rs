//! The event outbox through the real binary: at-least-once delivery that survives restarts
//! and crashes while the gateway is down, no replay of acknowledged events (after a clean stop,
//! and after a crash once the pod was quiet for a second), and a SIGTERM that stops within 5 s
//! and keeps what was not delivered.

mod common;

use std::time::{Duration, Instant};

use common::*;
use reqwest::StatusCode;
use wa_api::crd::Phase;
use wa_api::pod::{EventBody, MessageStatus, PodEvent};

fn phases(events: &[PodEvent]) -> Vec<Phase> {
    events
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::State { phase, .. } => Some(*phase),
            _ => None,
        })
        .collect()
}

fn count_receipts(events: &[PodEvent], status: MessageStatus) -> usize {
    events
        .iter()
        .filter(|e| matches!(&e.body, EventBody::Receipt(r) if r.status == status))
        .count()
}

async fn outbox_gauge(pod: &Pod) -> u64 {
    counter(pod, "wa_session_outbox_events").await
}

async fn counter(pod: &Pod, name: &str) -> u64 {
    let text = pod
        .get("/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name}"))
}

/// Waits for the next start's `Connected` after the first `delivered` events, and checks that
/// no event arrived twice; returns everything the sink has.
async fn connected_again_with_nothing_replayed(
    sink: &EventSink,
    delivered: usize,
) -> Vec<PodEvent> {
    let events = sink
        .wait_for("Connected after the restart", Duration::from_secs(5), |ev| {
            ev.len() > delivered && phases(&ev[delivered..]).contains(&Phase::Connected)
        })
        .await;
    assert!(
        duplicate_ids(&events).is_empty(),
        "replayed: {:?}",
        duplicate_ids(&events)
    );
    events
}

#[tokio::test]
async fn events_survive_restarts_while_the_gateway_is_down_and_arrive_once_it_is_up() {
    let port = free_port();
    let opts = PodOptions::sandbox().events_url(EventSink::url_for(port));
    let pod = Pod::start(opts).await;
    pod.pair().await;
    let (code, body) = pod
        .send_text("+15551234567", "queued while the gateway is down")
        .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let id = body["id"].as_str().unwrap().to_owned();
    // Starting, AwaitingScan, Connected, sent, delivered, read (and the boot event).
    let deadline = Instant::now() + Duration::from_secs(5);
    while outbox_gauge(&pod).await < 6 {
        assert!(Instant::now() < deadline, "events not in the outbox");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Nobody took them: they were synced to disk, not just written.
    assert!(counter(&pod, "wa_session_outbox_syncs_total").await >= 1);

    // A graceful restart, then a crash: still nothing delivered, nothing lost.
    let mut pod = pod.restart().await;
    pod.wait_phase(Phase::Connected, Duration::from_secs(5))
        .await;
    assert!(outbox_gauge(&pod).await >= 7, "kept across the restart");
    let (code, _) = pod
        .post_json(
            "/v1/sandbox/inbound",
            &serde_json::json!({"from": "+15550009999", "text": "after restart"}),
        )
        .await;
    assert_eq!(code, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(100)).await;
    pod.kill();
    let pod = Pod::start(pod.opts.clone().data_dir(&pod.data_dir.clone())).await;
    pod.wait_phase(Phase::Connected, Duration::from_secs(5))
        .await;

    // The gateway comes up: everything arrives, in order, once.
    let sink = EventSink::start_on(port).await;
    let events = sink
        .wait_for("all events", Duration::from_secs(10), |ev| {
            ev.iter().any(|e| matches!(&e.body, EventBody::Message(m) if m.text.as_deref() == Some("after restart")))
                && phases(ev).iter().filter(|p| **p == Phase::Connected).count() >= 3
        })
        .await;
    let ph = phases(&events);
    assert_eq!(
        ph.iter().filter(|p| **p == Phase::Starting).count(),
        3,
        "one boot event per start: {ph:?}"
    );
    assert_eq!(
        ph[..3],
        [Phase::Starting, Phase::AwaitingScan, Phase::Connected],
        "first run's events first: {ph:?}"
    );
    assert_eq!(count_receipts(&events, MessageStatus::Sent), 1);
    assert!(events.iter().any(|e| matches!(&e.body, EventBody::Receipt(r) if r.message_id == id && r.status == MessageStatus::Read)));
    assert!(
        duplicate_ids(&events).is_empty(),
        "{:?}",
        duplicate_ids(&events)
    );
    assert!(events.iter().all(|e| e.session == "test"));
    // Ids are UUIDv7: time-ordered, so the gateway can also sort by them.
    assert!(
        events
            .iter()
            .all(|e| uuid::Uuid::parse_str(&e.id).is_ok_and(|u| u.get_version_num() == 7))
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while outbox_gauge(&pod).await != 0 {
        assert!(Instant::now() < deadline, "outbox not emptied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn acknowledged_events_are_not_replayed_and_refused_ones_are_retried() {
    let sink = EventSink::start().await;
    let pod = Pod::start(
        PodOptions::sandbox()
            .events_url(&sink.url)
            .args(["--namespace", "team-a"]),
    )
    .await;
    pod.pair().await;
    let events = sink
        .wait_for("Connected", Duration::from_secs(5), |ev| {
            phases(ev).contains(&Phase::Connected)
        })
        .await;
    assert!(
        events
            .iter()
            .all(|e| e.namespace.as_deref() == Some("team-a") && e.session == "test")
    );

    // The gateway answers 500 for a while: the pod keeps the events and retries.
    sink.set_failing(true);
    let (code, body) = pod.send_text("+15551234567", "during an outage").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(outbox_gauge(&pod).await >= 1);
    let failures = counter(&pod, "wa_session_event_delivery_failures_total").await;
    assert!(failures >= 2, "retried: {failures}");
    sink.set_failing(false);
    let events = sink
        .wait_for(
            "read receipt after the outage",
            Duration::from_secs(5),
            |ev| count_receipts(ev, MessageStatus::Read) >= 1,
        )
        .await;
    assert!(duplicate_ids(&events).is_empty());

    // After a restart, nothing already acknowledged comes again.
    let delivered = sink.events().len();
    let pod = pod.restart().await;
    pod.wait_phase(Phase::Connected, Duration::from_secs(5))
        .await;
    let events = connected_again_with_nothing_replayed(&sink, delivered).await;
    assert_eq!(
        phases(&events[delivered..]),
        [Phase::Starting, Phase::Connected]
    );
}

#[tokio::test]
async fn a_quiet_pod_writes_its_acknowledgements_so_a_crash_replays_nothing() {
    // Acknowledgements reach the disk lazily (at most once a second while batches keep
    // coming); a pod with nothing left to deliver writes the last one within about a second.
    let sink = EventSink::start().await;
    let mut pod = Pod::start(PodOptions::sandbox().events_url(&sink.url)).await;
    pod.pair().await;
    let (code, body) = pod.send_text("+15551234567", "then quiet").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    sink.wait_for("read receipt", Duration::from_secs(5), |ev| {
        count_receipts(ev, MessageStatus::Read) >= 1
    })
    .await;
    // The gateway took every event at once: none needed an fdatasync (the acknowledged offset
    // is written, with the events before it, about once a second).
    let outbox = pod.data_dir.join("outbox");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let written = std::fs::metadata(outbox.join("events-0.jsonl")).unwrap().len();
        let acked = std::fs::read_to_string(outbox.join("acked")).unwrap_or_default();
        if acked.trim() == format!("0 {written}") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "acknowledgement not written while idle: acked {acked:?}, outbox {written} bytes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A crash now: nothing the gateway acknowledged comes again.
    let delivered = sink.events().len();
    pod.kill();
    let _pod = Pod::start(pod.opts.clone().data_dir(&pod.data_dir.clone())).await;
    connected_again_with_nothing_replayed(&sink, delivered).await;
}

#[tokio::test]
async fn sigterm_stops_within_5_seconds_and_keeps_the_outbox() {
    // The gateway is down (deliveries keep failing) and a long poll is open: neither may hold
    // up the stop.
    let port = free_port();
    let mut pod = Pod::start(
        PodOptions::sandbox()
            .events_url(EventSink::url_for(port))
            .args(["--events-retry-max-ms", "30000"]),
    )
    .await;
    let s = pod.pair().await;
    let poll = pod
        .get(&format!("/v1/status?after={}&waitSeconds=60", s.version))
        .send();
    let poll = tokio::spawn(poll);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pending = outbox_gauge(&pod).await;
    assert!(pending >= 3, "{pending}");
    let (status, took) = pod.terminate(Duration::from_secs(5));
    assert!(
        status.is_some_and(|s| s.success()),
        "no clean exit within 5 s: {status:?} after {took:?}\n{}",
        pod.log()
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    // The open long poll got an answer rather than a dropped connection.
    let answered = poll.await.unwrap();
    assert!(answered.is_ok_and(|r| r.status() == StatusCode::OK));
    let kept = std::fs::read_to_string(pod.data_dir.join("outbox/events-0.jsonl")).unwrap();
    assert!(
        kept.lines().count() >= 3,
        "undelivered events kept on disk: {kept}"
    );

    let sink = EventSink::start_on(port).await;
    let _pod = Pod::start(pod.opts.clone().data_dir(&pod.data_dir.clone())).await;
    let events = sink
        .wait_for("first run's Connected", Duration::from_secs(10), |ev| {
            phases(ev).starts_with(&[Phase::Starting, Phase::AwaitingScan, Phase::Connected])
        })
        .await;
    assert!(duplicate_ids(&events).is_empty());
}

#[tokio::test]
async fn without_an_events_url_nothing_is_kept() {
    let pod = Pod::start(PodOptions::sandbox()).await;
    pod.pair().await;
    let (code, _) = pod.send_text("+15551234567", "no gateway").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(outbox_gauge(&pod).await, 0);
    assert!(!pod.data_dir.join("outbox").exists());
}
