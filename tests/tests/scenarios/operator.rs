//! The operator under failure: SIGKILLed in the middle of its work and restarted (scenario 3),
//! and two replicas where the leader dies (scenario 7). Throughout, a watch on the session
//! pods checks that no session ever has two pods at once.

use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use wa_tests::census::PodWatch;
use wa_tests::process::wait_until;
use wa_tests::stack::metric_value;
use wa_tests::{Stack, StackConfig};

use crate::common::*;

/// Sessions in scenario 3: enough that a reconcile pass takes the debug operator a while.
const FLEET: usize = 40;
const ROLLED_MEMORY: &str = "40Mi";

fn fleet_manifest(resources: bool) -> String {
    (0..FLEET)
        .map(|i| {
            let mut doc = sandbox_manifest(&format!("s{i:02}"));
            if resources {
                doc.push_str(&format!("  resources:\n    requests: {{memory: {ROLLED_MEMORY}, cpu: 10m}}\n"));
            }
            doc
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

async fn list_pods(stack: &Stack) -> anyhow::Result<Vec<Pod>> {
    Ok(pods(stack).list(&ListParams::default().labels(wa_api::names::LABEL_SESSION)).await?.items)
}

fn has_rolled(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.containers[0].resources.as_ref())
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("memory"))
        .is_some_and(|q| q.0 == ROLLED_MEMORY)
}

/// Every session has its pod (rolled or not, as asked), and a status for its current
/// generation in phase AwaitingScan.
async fn converged(stack: &Stack, rolled: bool) -> anyhow::Result<()> {
    let result = converge_wait(stack, rolled).await;
    if result.is_err() {
        let lagging = lagging(stack).await;
        return result.with_context(|| format!("sessions not AwaitingScan: {lagging}"));
    }
    result
}

async fn converge_wait(stack: &Stack, rolled: bool) -> anyhow::Result<()> {
    wait_until(Duration::from_secs(120), &format!("{FLEET} sessions to converge (rolled: {rolled})"), || async {
        let pods = list_pods(stack).await.ok()?;
        let live = pods.iter().filter(|p| p.metadata.deletion_timestamp.is_none() && has_rolled(p) == rolled).count();
        let sessions = sessions(stack).list(&Default::default()).await.ok()?;
        let done = sessions
            .iter()
            .filter(|s| {
                s.status.as_ref().is_some_and(|st| {
                    st.observed_generation == s.metadata.generation && st.phase == Some(wa_api::Phase::AwaitingScan)
                })
            })
            .count();
        (pods.len() == FLEET && live == FLEET && done == FLEET).then_some(())
    })
    .await?;
    Ok(())
}

/// Sessions whose status lags their pod: the pod is Ready (its phase is the pod's to report)
/// but the object still says Starting or nothing — for the failure message.
async fn lagging(stack: &Stack) -> String {
    let Ok(list) = sessions(stack).list(&Default::default()).await else { return String::new() };
    let mut out = Vec::new();
    for s in list {
        let name = s.metadata.name.clone().unwrap_or_default();
        let phase = s.status.as_ref().and_then(|st| st.phase);
        if phase != Some(wa_api::Phase::AwaitingScan) {
            let ready = ready_now(stack, &name).await;
            out.push(format!("{name}: phase {phase:?}, pod ready: {ready}"));
        }
    }
    out.join("; ")
}

async fn ready_now(stack: &Stack, session: &str) -> bool {
    let Ok(Some(pod)) = pods(stack).get_opt(&format!("wa-{session}")).await else { return false };
    pod.status
        .and_then(|s| s.conditions)
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// SIGKILL the operator while it creates a fleet, restart it, and again while it rolls the
/// fleet's pods: each time it converges, and no session ever has two pods.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_operator_killed_mid_reconcile_converges_without_two_pods() {
    let mut stack = Stack::start(StackConfig::default()).await.expect("starting the stack");
    let census = PodWatch::start(stack.client(), stack.namespace()).await.expect("watching pods");
    let result = within(Duration::from_secs(240), async {
        // Creation: killed as soon as the first pod exists, while kubectl is still creating
        // the sessions (waiting for kubectl first let a fast operator finish 37 of 40 pods
        // before the first look, and sometimes all 40).
        step("creating the fleet");
        let kubectl = stack.kubectl().clone();
        let manifest = fleet_manifest(false);
        let applying = tokio::spawn(async move { kubectl.apply(&manifest, &[]).await });
        let first = wait_until(Duration::from_secs(60), "the operator's first pod", || async {
            let pods = list_pods(&stack).await.ok()?;
            (!pods.is_empty()).then_some(pods.len())
        })
        .await?;
        stack.operators[0].kill().await;
        applying.await.context("kubectl apply task")??;
        let at_kill = list_pods(&stack).await?.len();
        step(&format!("creation: killed the operator with {first}..{at_kill} of {FLEET} pods created"));
        ensure!(at_kill < FLEET, "the kill came after the work was done ({at_kill} pods): not mid-reconcile");
        stack.operators[0] = stack.start_operator("operator-0").await?;
        converged(&stack, false).await?;
        step("converged after the restart");

        // Roll: killed as soon as the first old pod is being deleted, kubectl still applying.
        step("rolling the fleet");
        let kubectl = stack.kubectl().clone();
        let manifest = fleet_manifest(true);
        let applying = tokio::spawn(async move { kubectl.apply(&manifest, &[]).await });
        wait_until(Duration::from_secs(60), "the operator to start rolling", || async {
            let pods = list_pods(&stack).await.ok()?;
            pods.iter().any(|p| p.metadata.deletion_timestamp.is_some() || has_rolled(p) || pods.len() < FLEET).then_some(())
        })
        .await?;
        stack.operators[0].kill().await;
        applying.await.context("kubectl apply task")??;
        let pods = list_pods(&stack).await?;
        let rolled = pods.iter().filter(|p| has_rolled(p)).count();
        step(&format!("roll: killed the operator with {rolled} of {FLEET} pods rolled, {} pods exist", pods.len()));
        ensure!(rolled < FLEET, "the kill came after the roll was done: not mid-reconcile");
        stack.operators[0] = stack.start_operator("operator-0").await?;
        converged(&stack, true).await?;
        step("converged after the restart");

        census.verdict()?;
        let (peak, seen) = census.with(|c| (c.peak(), c.sessions_seen()));
        ensure!(peak == 1 && seen == FLEET, "peak {peak} pods per session, {seen} sessions seen");
        Ok(())
    })
    .await;
    stack.finish(result).await;
}

async fn leader_of(stack: &Stack) -> anyhow::Result<Option<String>> {
    let lease = stack.kubectl().get_json(&["lease", "wa-operator"]).await?;
    Ok(lease["spec"]["holderIdentity"].as_str().filter(|h| !h.is_empty()).map(str::to_owned))
}

/// Two replicas: exactly one leads (the Lease and the metrics agree) and only it reconciles;
/// SIGKILL the leader and the other takes over once the Lease expires, then does the work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s7_two_replicas_one_leader_and_failover() {
    let config = StackConfig {
        operators: vec!["operator-a".into(), "operator-b".into()],
        ..StackConfig::default()
    };
    let mut stack = Stack::start(config).await.expect("starting the stack");
    let census = PodWatch::start(stack.client(), stack.namespace()).await.expect("watching pods");
    let phases = PhaseLog::start(&stack).await;
    let result = within(Duration::from_secs(240), async {
        let leader = wait_until(Duration::from_secs(30), "exactly one leader", || async {
            let a = stack.operators[0].is_leader().await?;
            let b = stack.operators[1].is_leader().await?;
            match (a, b) {
                (true, false) => Some(0),
                (false, true) => Some(1),
                _ => None,
            }
        })
        .await?;
        let standby = 1 - leader;
        ensure!(leader_of(&stack).await?.as_deref() == Some(stack.operators[leader].identity()), "the Lease names the leader");

        let mark = phases.mark();
        stack.kubectl().apply(&sandbox_manifest("first"), &[]).await?;
        phases.wait(mark, "first", "AwaitingScan", STEP).await?;
        let reconciles = |text: &str| metric_value(text, "wa_operator_reconciles_total{result=\"success\"}").unwrap_or(0.0);
        ensure!(reconciles(&stack.operators[leader].metrics().await?) >= 1.0, "the leader reconciled");
        ensure!(reconciles(&stack.operators[standby].metrics().await?) == 0.0, "the standby did not reconcile");

        let killed_at = Instant::now();
        stack.operators[leader].kill().await;
        let new_leader = stack.operators[standby].identity().to_owned();
        wait_until(Duration::from_secs(40), "the standby to take the Lease", || async {
            (stack.operators[standby].is_leader().await == Some(true)).then_some(())
        })
        .await?;
        let took = killed_at.elapsed();
        step(&format!("fail-over: the standby leads {took:?} after the leader's SIGKILL"));
        ensure!(leader_of(&stack).await?.as_deref() == Some(new_leader.as_str()), "the Lease names the new leader");

        // The new leader works: a new session gets its pod, a lost pod is recreated.
        let mark = phases.mark();
        stack.kubectl().apply(&sandbox_manifest("second"), &[]).await?;
        phases.wait(mark, "second", "AwaitingScan", STEP).await?;
        let before = ready_pod(&stack, "first", None).await?;
        delete_pod(&stack, "wa-first").await?;
        ready_pod(&stack, "first", Some(&uid(&before))).await?;
        ensure!(reconciles(&stack.operators[standby].metrics().await?) >= 2.0, "the new leader reconciled");
        census.verdict()
    })
    .await;
    stack.finish(result).await;
}
