//! A sandbox session's life as a user lives it: apply the example, scan, send, receive a
//! signed webhook (scenario 1); lose the pod (2); delete and re-apply the object (4); change
//! its resources (5); suspend and resume it (6). Sessions that come back must come back
//! paired: their phases, watched throughout, never pass through AwaitingScan again.

use std::time::Duration;

use anyhow::{Context as _, ensure};
use reqwest::StatusCode;
use serde_json::json;
use wa_tests::census::PodWatch;
use wa_tests::{Stack, StackConfig};

use crate::common::*;

const TO: &str = "+15551234567";

async fn stack() -> (Stack, PodWatch, PhaseLog) {
    let stack = Stack::start(StackConfig::default()).await.expect("starting the stack");
    let census = PodWatch::start(stack.client(), stack.namespace()).await.expect("watching pods");
    let phases = PhaseLog::start(&stack).await;
    (stack, census, phases)
}

/// `kubectl apply -f examples/session-sandbox.yaml` → PVC, Secret, Pod → AwaitingScan →
/// scan through the gateway → `kubectl wait --for=condition=Connected` → a send through the
/// gateway (201 with an id) → delivered → the receipt reaches a webhook, correctly signed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s1_apply_scan_send_and_get_a_signed_webhook() {
    let (stack, census, phases) = stack().await;
    let result = within(Duration::from_secs(120), async {
        let kubectl = stack.kubectl();
        let mark = phases.mark();
        let out = kubectl.ok(&["apply", "-f", &example_path("session-sandbox.yaml")]).await?;
        ensure!(out.contains("whatsappsession.wa-operator.dev/sandbox created"), "{out}");

        let shown = phases.wait(mark, "sandbox", "AwaitingScan", STEP).await?;
        ensure!(!shown.iter().any(|p| p == "Connected"), "{shown:?}");

        // The operator's children, as kubectl shows them.
        let session = sessions(&stack).get("sandbox").await?;
        let finalizers = session.metadata.finalizers.unwrap_or_default();
        ensure!(finalizers.iter().any(|f| f == wa_api::names::FINALIZER), "the operator's finalizer: {finalizers:?}");
        let pod = ready_pod(&stack, "sandbox", None).await?;
        let pvc = kubectl.get_json(&["pvc", "wa-sandbox-auth"]).await?;
        ensure!(pvc["status"]["phase"] == "Bound", "the auth claim is bound: {pvc}");
        let secret = kubectl.get_json(&["secret", "wa-sandbox-token"]).await?;
        ensure!(secret["data"]["token"].is_string(), "the token Secret holds a token");
        let owner = &pod.metadata.owner_references.as_ref().context("the pod has an owner")?[0];
        ensure!(owner.kind == "WhatsAppSession" && owner.name == "sandbox", "{owner:?}");
        let volumes = serde_json::to_value(&pod.spec.as_ref().context("pod spec")?.volumes)?;
        ensure!(volumes.to_string().contains("wa-sandbox-auth"), "the pod mounts the claim: {volumes}");

        let table = kubectl.ok(&["get", "wa", "sandbox"]).await?;
        ensure!(table.contains("AwaitingScan") && table.contains("sandbox"), "kubectl get wa: {table}");

        // An integrator registers a webhook with the gateway before pairing.
        let hooks = WebhookReceiver::start().await;
        let secret = "scenario-one-signing-secret";
        let (code, body) = stack
            .gateway
            .post("/v1/sessions/sandbox/webhooks", &json!({"url": hooks.url, "events": ["state", "receipt"], "secret": secret}))
            .await?;
        ensure!(code == StatusCode::CREATED, "registering a webhook: {code} {body}");

        sandbox_scan(&stack, "sandbox").await?;
        kubectl_wait_connected(&stack, "sandbox").await?;
        let table = kubectl.ok(&["get", "wa", "sandbox"]).await?;
        ensure!(table.contains("Connected") && table.contains("@s.whatsapp.net"), "kubectl get wa: {table}");

        gateway_session(&stack, "sandbox", "Connected").await?;
        let id = send_text(&stack, "sandbox", TO, "hello from scenario 1").await?;
        let message = wait_delivered(&stack, &id).await?;
        ensure!(message["id"] == id.as_str(), "{message}");

        let receipt = hooks
            .wait_for("a signed delivered receipt webhook", |d| {
                let body = d.json();
                body["type"] == "receipt" && body["data"]["messageId"] == id.as_str() && body["data"]["status"] == "delivered"
            })
            .await?;
        assert_signed(secret, &receipt)?;
        ensure!(receipt.header("x-wa-event") == Some("receipt"), "{:?}", receipt.headers);
        let state = hooks
            .wait_for("the Connected state webhook", |d| d.json()["type"] == "state" && d.json()["data"]["phase"] == "Connected")
            .await?;
        assert_signed(secret, &state)?;
        census.verdict()
    })
    .await;
    stack.finish(result).await;
}

/// Delete the pod: the operator recreates it, the session comes back paired from its
/// volume (never AwaitingScan), and sends work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s2_a_deleted_pod_comes_back_paired() {
    let (stack, census, phases) = stack().await;
    let result = within(Duration::from_secs(120), async {
        let account = connect_sandbox_example(&stack, &phases).await?;
        let before = ready_pod(&stack, "sandbox", None).await?;
        let pvc = pvcs(&stack).get("wa-sandbox-auth").await?;

        let mark = phases.mark();
        delete_pod(&stack, "wa-sandbox").await?;
        let after = ready_pod(&stack, "sandbox", Some(&uid(&before))).await?;
        let went = phases.wait(mark, "sandbox", "Connected", STEP).await?;
        ensure!(went.first().is_some_and(|p| p != "Connected"), "the status left Connected while the pod was gone: {went:?}");
        ensure!(!went.iter().any(|p| p == "AwaitingScan"), "a recreated pod needed a new scan: {went:?}");
        kubectl_wait_connected(&stack, "sandbox").await?;
        let session = sessions(&stack).get("sandbox").await?;
        ensure!(session.status.and_then(|s| s.account).map(|a| a.jid) == Some(account.clone()), "same account");
        ensure!(uid(&pvcs(&stack).get("wa-sandbox-auth").await?) == uid(&pvc), "same claim");
        ensure!(uid(&after) != uid(&before));

        gateway_session(&stack, "sandbox", "Connected").await?;
        let id = send_text(&stack, "sandbox", TO, "after the pod came back").await?;
        wait_delivered(&stack, &id).await?;
        census.verdict()
    })
    .await;
    stack.finish(result).await;
}

/// `kubectl delete wa` runs the operator's finalizer: the pod goes, the retained claim stays;
/// applying the example again reconnects from that claim without a scan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s4_delete_keeps_the_volume_and_reapply_reconnects_without_a_scan() {
    let (stack, census, phases) = stack().await;
    let result = within(Duration::from_secs(120), async {
        let kubectl = stack.kubectl();
        let account = connect_sandbox_example(&stack, &phases).await?;
        let first = sessions(&stack).get("sandbox").await?;
        ensure!(
            first.metadata.finalizers.as_deref().unwrap_or_default().iter().any(|f| f == wa_api::names::FINALIZER),
            "the operator's finalizer is on the object: {:?}",
            first.metadata.finalizers
        );
        let pvc = pvcs(&stack).get("wa-sandbox-auth").await?;
        ensure!(pvc.metadata.owner_references.as_deref().unwrap_or_default().is_empty(), "a retained claim has no owner");

        // kubectl waits for the object to be gone, i.e. for the finalizer to be removed.
        let out = kubectl.ok(&["delete", "wa", "sandbox", "--timeout=60s"]).await?;
        ensure!(out.contains("deleted"), "{out}");
        ensure!(sessions(&stack).get_opt("sandbox").await?.is_none());
        pod_gone(&stack, "sandbox").await?;
        let kept = pvcs(&stack).get_opt("wa-sandbox-auth").await?.context("the retained claim was deleted")?;
        ensure!(uid(&kept) == uid(&pvc) && kept.metadata.deletion_timestamp.is_none(), "the claim is the same, not terminating");
        wait_until_gone(&stack, "secret", "wa-sandbox-token").await?;
        let events = kubectl.ok(&["get", "events", "--field-selector", "involvedObject.name=sandbox"]).await?;
        ensure!(events.contains("Connected"), "the operator's Events are kept: {events}");

        let mark = phases.mark();
        let out = kubectl.ok(&["apply", "-f", &example_path("session-sandbox.yaml")]).await?;
        ensure!(out.contains("created"), "{out}");
        let went = phases.wait(mark, "sandbox", "Connected", STEP).await?;
        ensure!(!went.iter().any(|p| p == "AwaitingScan"), "re-applied session needed a scan: {went:?}");
        let second = sessions(&stack).get("sandbox").await?;
        ensure!(uid(&second) != uid(&first), "a new object");
        ensure!(second.status.and_then(|s| s.account).map(|a| a.jid) == Some(account), "same account");
        ensure!(uid(&pvcs(&stack).get("wa-sandbox-auth").await?) == uid(&pvc), "the same claim was reused");
        kubectl_wait_connected(&stack, "sandbox").await?;
        gateway_session(&stack, "sandbox", "Connected").await?;
        let id = send_text(&stack, "sandbox", TO, "after re-apply").await?;
        wait_delivered(&stack, &id).await?;
        census.verdict()
    })
    .await;
    stack.finish(result).await;
}

async fn wait_until_gone(stack: &Stack, kind: &str, name: &str) -> anyhow::Result<()> {
    wa_tests::process::wait_until(STEP, &format!("{kind} {name} to be gone"), || async {
        let out = stack.kubectl().run(&["get", kind, name, "-o", "name"]).await.ok()?;
        (!out.success && out.stderr.contains("NotFound")).then_some(())
    })
    .await
}

/// New resources in the spec roll the pod (delete, then create; never two), keep the claim,
/// and the session comes back paired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s5_changed_resources_roll_the_pod_and_keep_the_volume() {
    let (stack, census, phases) = stack().await;
    let result = within(Duration::from_secs(120), async {
        connect_sandbox_example(&stack, &phases).await?;
        let before = ready_pod(&stack, "sandbox", None).await?;
        let pvc = pvcs(&stack).get("wa-sandbox-auth").await?;
        let generation = sessions(&stack).get("sandbox").await?.metadata.generation;

        let mark = phases.mark();
        let manifest = format!(
            "{}  resources:\n    requests: {{memory: 48Mi, cpu: 20m}}\n    limits: {{memory: 192Mi}}\n",
            sandbox_manifest("sandbox")
        );
        let out = stack.kubectl().apply(&manifest, &[]).await?;
        ensure!(out.contains("configured"), "{out}");
        let after = ready_pod(&stack, "sandbox", Some(&uid(&before))).await?;
        let resources = serde_json::to_value(&after.spec.as_ref().context("spec")?.containers[0].resources)?;
        ensure!(
            resources == json!({"requests": {"memory": "48Mi", "cpu": "20m"}, "limits": {"memory": "192Mi"}}),
            "the new pod has the new resources: {resources}"
        );
        let went = phases.wait(mark, "sandbox", "Connected", STEP).await?;
        ensure!(!went.iter().any(|p| p == "AwaitingScan"), "a rolled pod needed a new scan: {went:?}");
        ensure!(uid(&pvcs(&stack).get("wa-sandbox-auth").await?) == uid(&pvc), "same claim");
        let session = sessions(&stack).get("sandbox").await?;
        ensure!(session.metadata.generation > generation, "the spec change bumped the generation");
        wa_tests::process::wait_until(STEP, "observedGeneration to follow", || {
            let api = sessions(&stack);
            async move {
                let s = api.get("sandbox").await.ok()?;
                (s.status?.observed_generation == s.metadata.generation).then_some(())
            }
        })
        .await?;
        let events = stack.kubectl().ok(&["get", "events", "--field-selector", "involvedObject.name=sandbox,reason=Rolled"]).await?;
        ensure!(events.contains("Rolled"), "a Rolled Event: {events}");
        gateway_session(&stack, "sandbox", "Connected").await?;
        let id = send_text(&stack, "sandbox", TO, "after the roll").await?;
        wait_delivered(&stack, &id).await?;
        census.verdict()
    })
    .await;
    stack.finish(result).await;
}

/// `suspend: true` removes the pod and keeps the claim (phase Suspended; the gateway refuses
/// sends with a stable code); `suspend: false` brings it back Connected without a scan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s6_suspend_and_resume() {
    let (stack, census, phases) = stack().await;
    let result = within(Duration::from_secs(120), async {
        let kubectl = stack.kubectl();
        connect_sandbox_example(&stack, &phases).await?;
        let pvc = pvcs(&stack).get("wa-sandbox-auth").await?;

        let mark = phases.mark();
        kubectl.ok(&["patch", "wa", "sandbox", "--type=merge", "-p", r#"{"spec":{"suspend":true}}"#]).await?;
        phases.wait(mark, "sandbox", "Suspended", STEP).await?;
        pod_gone(&stack, "sandbox").await?;
        ensure!(uid(&pvcs(&stack).get("wa-sandbox-auth").await?) == uid(&pvc), "the claim is kept");
        let table = kubectl.ok(&["get", "wa", "sandbox"]).await?;
        ensure!(table.contains("Suspended"), "{table}");
        let (code, body) = stack
            .gateway
            .post("/v1/sessions/sandbox/messages", &json!({"to": TO, "type": "text", "text": "while suspended"}))
            .await?;
        ensure!(
            code == StatusCode::SERVICE_UNAVAILABLE && body["error"]["code"] == "SESSION_NOT_READY",
            "a send to a suspended session: {code} {body}"
        );

        let mark = phases.mark();
        kubectl.ok(&["patch", "wa", "sandbox", "--type=merge", "-p", r#"{"spec":{"suspend":false}}"#]).await?;
        let went = phases.wait(mark, "sandbox", "Connected", STEP).await?;
        ensure!(!went.iter().any(|p| p == "AwaitingScan"), "a resumed session needed a scan: {went:?}");
        kubectl_wait_connected(&stack, "sandbox").await?;
        gateway_session(&stack, "sandbox", "Connected").await?;
        let id = send_text(&stack, "sandbox", TO, "after resume").await?;
        wait_delivered(&stack, &id).await?;
        census.verdict()
    })
    .await;
    stack.finish(result).await;
}
