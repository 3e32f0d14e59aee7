//! Scenario 8: 200 sessions applied at once (one `kubectl apply`) → all Connected, each
//! reachable through the gateway (a send to every one answers 201 and is delivered).

use std::time::{Duration, Instant};

use anyhow::ensure;
use futures::{StreamExt as _, TryStreamExt as _};
use reqwest::StatusCode;
use wa_tests::census::PodWatch;
use wa_tests::process::wait_until;
use wa_tests::{Stack, StackConfig, TestClusterConfig};

use crate::common::*;

const SESSIONS: usize = 200;
/// Gateway calls in flight at once.
const PARALLEL: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s8_two_hundred_sessions_at_once() {
    let config = StackConfig {
        // The pods' own probe periods (readiness 2 s) instead of the tests' 250 ms: 200 pods
        // probed four times a second would crowd out the work on two cores.
        cluster: TestClusterConfig { probe_period: Duration::from_secs(2), ..TestClusterConfig::default() },
        ..StackConfig::default()
    };
    let stack = Stack::start(config).await.expect("starting the stack");
    let census = PodWatch::start(stack.client(), stack.namespace()).await.expect("watching pods");
    let result = within(Duration::from_secs(270), async {
        let stack = &stack;
        let names: Vec<String> = (0..SESSIONS).map(|i| format!("fleet-{i:03}")).collect();
        let manifest = names.iter().map(|n| sandbox_manifest(n)).collect::<Vec<_>>().join("---\n");
        // kubectl creates the 200 objects one request at a time: on a loaded 2-core machine
        // that alone can pass the default 60 s a kubectl call gets here.
        let kubectl = stack.kubectl().clone().with_timeout(Duration::from_secs(200));
        let started = Instant::now();
        let out = kubectl.apply(&manifest, &[]).await?;
        ensure!(out.matches(" created").count() == SESSIONS, "kubectl apply created them all: {out}");

        // All awaiting a scan and routable through the gateway.
        wait_until(Duration::from_secs(240), "all sessions AwaitingScan and ready at the gateway", || async {
            let (code, body) = stack.gateway.get("/v1/sessions").await.ok()?;
            let items = body["items"].as_array()?;
            let waiting = items.iter().filter(|s| s["phase"] == "AwaitingScan" && s["ready"] == true).count();
            (code == StatusCode::OK && waiting == SESSIONS).then_some(())
        })
        .await?;
        let awaiting = started.elapsed();

        futures::stream::iter(names.iter().map(Ok::<_, anyhow::Error>))
            .try_for_each_concurrent(PARALLEL, |name| sandbox_scan(stack, name))
            .await?;
        kubectl.ok(&["wait", "--for=condition=Connected", "wa", "--all", "--timeout=180s"]).await?;
        let connected = started.elapsed();

        // Each one reachable through the gateway: a send answered 201, then delivered.
        let ids: Vec<String> = futures::stream::iter(names.iter())
            .map(|name| async move { send_text(stack, name, "+15551234567", &format!("hello from {name}")).await })
            .buffer_unordered(PARALLEL)
            .try_collect()
            .await?;
        futures::stream::iter(ids.iter().map(Ok::<_, anyhow::Error>))
            .try_for_each_concurrent(PARALLEL, |id| async move { wait_delivered(stack, id).await.map(drop) })
            .await?;
        step(&format!(
            "{SESSIONS} sessions: AwaitingScan and routable after {awaiting:?}, Connected after {connected:?}, \
             all sent and delivered after {:?}",
            started.elapsed()
        ));

        census.verdict()?;
        let (peak, seen, current) = census.with(|c| (c.peak(), c.sessions_seen(), c.current().len()));
        ensure!(peak == 1 && seen == SESSIONS && current == SESSIONS, "pods per session peak {peak}; {seen} seen, {current} now");
        Ok(())
    })
    .await;
    stack.finish(result).await;
}
