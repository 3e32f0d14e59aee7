//! Scenario 1's flow with the real `whatsapp` engine: the session pods the operator creates
//! run wa-rs against the WhatsApp protocol emulator (the operator's `--session-env` points
//! them at it), a simulated phone scans the QR code the gateway hands out, and what the
//! engine sends arrives decrypted at a simulated contact. The webhook is declared in the
//! session's spec with its signing key in a Secret, the Kubernetes-native way. Then the pod
//! is deleted and comes back paired from its volume.

use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use reqwest::StatusCode;
use serde_json::{Value, json};
use wa_api::pod::env;
use wa_emulator::{Emulator, EmulatorConfig};
use wa_tests::census::PodWatch;
use wa_tests::{Stack, StackConfig};

use crate::common::*;

const OWN: &str = "+15550000001";
const CONTACT: &str = "+15557654321";
const SIGNING_KEY: &str = "whatsapp-scenario-signing-key";

/// `examples/session-qr.yaml` with a webhook to `url` signed with a key from a Secret.
fn manifest(url: &str) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(example_path("session-qr.yaml"))?;
    let mut session: Value = serde_yaml::from_str(&text)?;
    session["spec"]["webhooks"] = json!([{
        "url": url,
        "events": ["message", "receipt", "state"],
        "secretRef": {"name": "support-webhook", "key": "signing-key"},
    }]);
    let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "support-webhook"},
        "stringData": {"signing-key": SIGNING_KEY}});
    Ok(format!("{}---\n{}", serde_yaml::to_string(&secret)?, serde_yaml::to_string(&session)?))
}

/// The simulated phone scans the code the gateway shows; retried with the next code when
/// the one read has just expired.
async fn scan_with_phone(stack: &Stack, emu: &wa_emulator::EmulatorHandle) -> anyhow::Result<()> {
    let mut last = String::new();
    for _ in 0..3 {
        let code = qr_code(stack, "support").await?;
        match emu.scan(&code, OWN, Some("Support desk")).await {
            Ok(_) => return Ok(()),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    bail!("the phone could not scan the QR code: {last}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whatsapp_engine_session_against_the_protocol_emulator() {
    let emu = Emulator::start(EmulatorConfig::default()).await.expect("starting the WhatsApp emulator");
    let config = StackConfig {
        operator_args: vec![
            "--session-env".into(),
            format!("{}={}", env::SERVER_URL, emu.ws_url()),
            "--session-env".into(),
            format!("{}={}", env::MEDIA_URL, emu.media_url()),
        ],
        ..StackConfig::default()
    };
    let stack = Stack::start(config).await.expect("starting the stack");
    let census = PodWatch::start(stack.client(), stack.namespace()).await.expect("watching pods");
    let phases = PhaseLog::start(&stack).await;
    let result = within(Duration::from_secs(120), async {
        let hooks = WebhookReceiver::start().await;
        let mark = phases.mark();
        let out = stack.kubectl().apply(&manifest(&hooks.url)?, &[]).await?;
        ensure!(out.contains("secret/support-webhook created") && out.contains("whatsappsession.wa-operator.dev/support created"), "{out}");
        phases.wait(mark, "support", "AwaitingScan", STEP).await?;
        let pod = ready_pod(&stack, "support", None).await?;
        let pod_env = serde_json::to_value(&pod.spec.as_ref().context("spec")?.containers[0].env)?;
        ensure!(pod_env.to_string().contains(&emu.ws_url()), "the operator passed --session-env to the pod: {pod_env}");

        // The engine is never substituted: no sandbox routes on a whatsapp session.
        let (code, body) = stack.gateway.post("/v1/sessions/support/sandbox/scan", &json!({})).await?;
        ensure!(code.is_client_error(), "sandbox scan on a whatsapp session: {code} {body}");

        scan_with_phone(&stack, &emu).await?;
        kubectl_wait_connected(&stack, "support").await?;
        let session = sessions(&stack).get("support").await?;
        let status = session.status.context("status")?;
        ensure!(status.account.as_ref().map(|a| a.jid.as_str()) == Some("15550000001@s.whatsapp.net"), "{:?}", status.account);
        let table = stack.kubectl().ok(&["get", "wa", "support"]).await?;
        ensure!(table.contains("Connected") && table.contains("whatsapp"), "{table}");

        // A send through the gateway arrives decrypted at the contact's phone; the contact's
        // delivery receipt comes back as a webhook signed with the Secret's key.
        gateway_session(&stack, "support", "Connected").await?;
        let id = send_text(&stack, "support", CONTACT, "hello through the real engine").await?;
        let arrived = emu
            .wait_for_message(CONTACT, STEP, |m| m.text.as_deref() == Some("hello through the real engine"))
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        ensure!(arrived.from == "15550000001" && arrived.kind == "text", "{arrived:?}");
        wait_delivered(&stack, &id).await?;
        let receipt = hooks
            .wait_for("the delivered receipt webhook", |d| {
                let b = d.json();
                b["type"] == "receipt" && b["data"]["messageId"] == id.as_str() && b["data"]["status"] == "delivered"
            })
            .await?;
        assert_signed(SIGNING_KEY, &receipt)?;

        // The contact answers: an inbound message webhook, signed.
        emu.send_text(CONTACT, OWN, "hello back from the phone").await.map_err(|e| anyhow::anyhow!("{e}"))?;
        let inbound = hooks
            .wait_for("the inbound message webhook", |d| {
                let b = d.json();
                b["type"] == "message" && b["data"]["text"] == "hello back from the phone"
            })
            .await?;
        assert_signed(SIGNING_KEY, &inbound)?;
        ensure!(inbound.json()["data"]["from"].as_str().is_some_and(|f| f.contains("15557654321")), "{:?}", inbound.json());

        // The pod is deleted: the new one logs in with the identity on the volume, no scan.
        let mark = phases.mark();
        delete_pod(&stack, "wa-support").await?;
        ready_pod(&stack, "support", Some(&uid(&pod))).await?;
        let went = phases.wait(mark, "support", "Connected", STEP).await?;
        ensure!(!went.iter().any(|p| p == "AwaitingScan"), "the recreated pod needed a new scan: {went:?}");
        gateway_session(&stack, "support", "Connected").await?;
        let (code, _) = stack.gateway.get("/v1/sessions/support").await?;
        ensure!(code == StatusCode::OK);
        send_text(&stack, "support", CONTACT, "still paired after the pod came back").await?;
        emu.wait_for_message(CONTACT, STEP, |m| m.text.as_deref() == Some("still paired after the pod came back"))
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        census.verdict()
    })
    .await;
    stack.finish(result).await;
}
