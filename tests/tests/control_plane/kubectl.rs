//! Real kubectl against the emulator: what a platform engineer types.

use std::time::Duration;

use kube::api::{Patch, PatchParams};
use serde_json::json;
use wa_tests::{TestCluster, TestClusterConfig};

use crate::{repo_root, sessions};

async fn cluster() -> TestCluster {
    TestCluster::start_with(TestClusterConfig::default().without_pod_runner())
        .await
        .expect("starting the control plane")
}

const SESSION: &str = "apiVersion: wa-operator.dev/v1alpha1
kind: WhatsAppSession
metadata:
  name: support
spec:
  engine: sandbox
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_get_wait_and_delete_a_session() {
    let cluster = cluster().await;
    let kubectl = cluster.kubectl().unwrap();
    let crd = repo_root().join("crds/whatsappsession.yaml");
    let out = kubectl.ok(&["apply", "-f", crd.to_str().unwrap()]).await.unwrap();
    assert!(out.contains("customresourcedefinition.apiextensions.k8s.io/whatsappsessions.wa-operator.dev created"), "{out}");
    kubectl
        .ok(&["wait", "--for=condition=Established", "crd/whatsappsessions.wa-operator.dev", "--timeout=10s"])
        .await
        .unwrap();

    let out = kubectl.apply(SESSION, &[]).await.unwrap();
    assert_eq!(out.trim(), "whatsappsession.wa-operator.dev/support created");

    // Server-side printing with the CRD's printer columns.
    let table = kubectl.ok(&["get", "wa"]).await.unwrap();
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "PHASE", "ACCOUNT", "ENGINE", "AGE"]);
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(&row[..2], ["support", "sandbox"], "no phase or account yet: {table}");
    assert!(row[2].ends_with('s'), "age column: {table}");

    // Schema defaults were applied on create.
    let obj = kubectl.get_json(&["wa", "support"]).await.unwrap();
    assert_eq!(obj["spec"]["rateLimit"], json!({"burst": 5, "messagesPerMinute": 30}));
    assert_eq!(obj["spec"]["storage"]["retainOnDelete"], true);
    assert_eq!(obj["metadata"]["generation"], 1);

    // A second apply is a three-way merge patch; the spec change bumps the generation.
    let changed = SESSION.replace("engine: sandbox", "engine: sandbox\n  suspend: true");
    let out = kubectl.apply(&changed, &[]).await.unwrap();
    assert_eq!(out.trim(), "whatsappsession.wa-operator.dev/support configured");
    let out = kubectl.apply(&changed, &[]).await.unwrap();
    assert_eq!(out.trim(), "whatsappsession.wa-operator.dev/support unchanged");
    let obj = kubectl.get_json(&["wa", "support"]).await.unwrap();
    assert_eq!((obj["spec"]["suspend"].clone(), obj["metadata"]["generation"].clone()), (json!(true), json!(2)));

    // kubectl wait sees a condition the operator would set through the status subresource.
    let waiter = {
        let kubectl = kubectl.clone();
        tokio::spawn(async move { kubectl.run(&["wait", "--for=condition=Connected", "wa/support", "--timeout=20s"]).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = json!({"status": {"phase": "Connected", "observedGeneration": 2, "conditions": [{
        "type": "Connected", "status": "True", "reason": "Paired", "message": "online",
        "lastTransitionTime": "2025-01-01T00:00:00Z", "observedGeneration": 2}]}});
    sessions(&cluster.client(), "default")
        .patch_status("support", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    let out = waiter.await.unwrap().unwrap();
    assert!(out.success, "kubectl wait failed: {}", out.stderr);
    assert_eq!(out.stdout.trim(), "whatsappsession.wa-operator.dev/support condition met");
    let table = kubectl.ok(&["get", "wa", "support", "--no-headers"]).await.unwrap();
    assert!(table.contains("Connected"), "{table}");

    // Deleting waits for the finalizer; kubectl wait --for=delete returns once it is gone.
    let finalizer = json!({"metadata": {"finalizers": ["wa-operator.dev/cleanup"]}});
    sessions(&cluster.client(), "default")
        .patch("support", &PatchParams::default(), &Patch::Merge(&finalizer))
        .await
        .unwrap();
    let out = kubectl.ok(&["delete", "wa", "support", "--wait=false"]).await.unwrap();
    assert_eq!(out.trim(), "whatsappsession.wa-operator.dev \"support\" deleted");
    let obj = kubectl.get_json(&["wa", "support"]).await.unwrap();
    assert!(obj["metadata"]["deletionTimestamp"].is_string(), "still there, being deleted");
    let waiter = {
        let kubectl = kubectl.clone();
        tokio::spawn(async move { kubectl.run(&["wait", "--for=delete", "wa/support", "--timeout=20s"]).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiter.is_finished(), "kubectl wait --for=delete returned while the finalizer was there");
    let clear = json!({"metadata": {"finalizers": null}});
    sessions(&cluster.client(), "default")
        .patch("support", &PatchParams::default(), &Patch::Merge(&clear))
        .await
        .unwrap();
    let out = waiter.await.unwrap().unwrap();
    assert!(out.success, "kubectl wait --for=delete failed: {}", out.stderr);
    let out = kubectl.run(&["get", "wa", "support"]).await.unwrap();
    assert!(!out.success);
    assert!(out.stderr.contains("NotFound") && out.stderr.contains("\"support\" not found"), "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sessions_are_refused_with_the_field_and_the_rule() {
    let cluster = cluster().await;
    cluster.install_crd().await.unwrap();
    let kubectl = cluster.kubectl().unwrap();
    let cases = [
        ("phoneNumber: \"555\"", "spec.phoneNumber in body should match '^\\+[1-9][0-9]{6,14}$'"),
        ("engine: telegram", "Unsupported value: \"telegram\": supported values: \"whatsapp\", \"sandbox\""),
        ("rateLimit: {burst: 0}", "spec.rateLimit.burst in body should be greater than or equal to 1"),
        ("webhooks: [{url: \"ftp://x\"}]", "spec.webhooks[0].url in body should match"),
    ];
    for (spec, message) in cases {
        let manifest = format!("apiVersion: wa-operator.dev/v1alpha1\nkind: WhatsAppSession\nmetadata: {{name: bad}}\nspec: {{{spec}}}\n");
        let out = kubectl.run_with_input(&["apply", "-f", "-"], Some(&manifest)).await.unwrap();
        assert!(!out.success, "{spec} was accepted");
        assert!(out.stderr.contains(message), "{spec}: {}", out.stderr);
    }
    let out = kubectl.run(&["get", "wa", "bad"]).await.unwrap();
    assert!(!out.success, "nothing was stored");

    // A misspelt field: kubectl >= 1.25 asks for strict validation and is refused; older
    // kubectl (Debian's 1.20) does not ask, and gets the server's default, a warning.
    let manifest = "apiVersion: wa-operator.dev/v1alpha1\nkind: WhatsAppSession\nmetadata: {name: typo}\nspec: {phoneNumbr: \"+15551234567\"}\n";
    let out = kubectl.run_with_input(&["apply", "-f", "-"], Some(manifest)).await.unwrap();
    if out.success {
        assert!(out.stderr.contains("unknown field \"spec.phoneNumbr\""), "no warning: {}", out.stderr);
        let obj = kubectl.get_json(&["wa", "typo"]).await.unwrap();
        assert!(obj["spec"].get("phoneNumbr").is_none(), "unknown fields are pruned");
    } else {
        assert!(out.stderr.contains("strict decoding error: unknown field \"spec.phoneNumbr\""), "{}", out.stderr);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_side_apply_reports_and_forces_conflicts() {
    let cluster = cluster().await;
    cluster.install_crd().await.unwrap();
    let kubectl = cluster.kubectl().unwrap();
    let out = kubectl.apply(SESSION, &["--server-side"]).await.unwrap();
    assert_eq!(out.trim(), "whatsappsession.wa-operator.dev/support serverside-applied");
    // Another manager takes the engine.
    let theirs = json!({"apiVersion": "wa-operator.dev/v1alpha1", "kind": "WhatsAppSession", "spec": {"engine": "whatsapp"}});
    sessions(&cluster.client(), "default")
        .patch("support", &PatchParams::apply("someone-else").force(), &Patch::Apply(&theirs))
        .await
        .unwrap();
    let out = kubectl.run_with_input(&["apply", "--server-side", "-f", "-"], Some(SESSION)).await.unwrap();
    assert!(!out.success);
    assert!(out.stderr.contains("conflict with \"someone-else\""), "{}", out.stderr);
    assert!(out.stderr.contains(".spec.engine"), "{}", out.stderr);
    kubectl.apply(SESSION, &["--server-side", "--force-conflicts"]).await.unwrap();
    let obj = sessions(&cluster.client(), "default").get("support").await.unwrap();
    assert_eq!(obj.data["spec"]["engine"], "sandbox");
    let managers: Vec<(String, String)> = obj
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .map(|m| (m.manager.unwrap_or_default(), m.operation.unwrap_or_default()))
        .collect();
    assert!(managers.contains(&("kubectl".into(), "Apply".into())), "{managers:?}");
    // Dry runs change nothing. (Through kube-rs: kubectl before 1.23 decides from
    // /openapi/v2, which this server leaves empty, that no kind supports dry runs.)
    let dry = json!({"apiVersion": "wa-operator.dev/v1alpha1", "kind": "WhatsAppSession", "spec": {"engine": "whatsapp"}});
    let answer = sessions(&cluster.client(), "default")
        .patch("support", &PatchParams::apply("kubectl").force().dry_run(), &Patch::Apply(&dry))
        .await
        .unwrap();
    assert_eq!(answer.data["spec"]["engine"], "whatsapp", "the dry run answers the result");
    let obj = kubectl.get_json(&["wa", "support"]).await.unwrap();
    assert_eq!(obj["spec"]["engine"], "sandbox");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn built_in_kinds_take_strategic_merge_patches() {
    let cluster = cluster().await;
    let kubectl = cluster.kubectl().unwrap();
    let manifest = |value: &str, image: &str| {
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: hook, labels: {{app: wa}}}}\nstringData: {{key: {value}}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: p, labels: {{app: wa}}}}\nspec:\n  containers:\n  - name: main\n    image: {image}\n    env: [{{name: A, value: \"1\"}}]\n  - name: side\n    image: side:1\n"
        )
    };
    kubectl.apply(&manifest("one", "wa-session:1"), &[]).await.unwrap();
    // Client-side apply of built-ins sends strategic merge patches (containers merge by name).
    let out = kubectl.apply(&manifest("two", "wa-session:2"), &[]).await.unwrap();
    assert!(out.contains("secret/hook configured") && out.contains("pod/p configured"), "{out}");
    let secret = kubectl.get_json(&["secret", "hook"]).await.unwrap();
    assert_eq!(secret["data"]["key"], "dHdv", "stringData is stored base64 in data");
    assert!(secret.get("stringData").is_none());
    let pod = kubectl.get_json(&["pod", "p"]).await.unwrap();
    assert_eq!(pod["spec"]["containers"][0]["image"], "wa-session:2");
    assert_eq!(pod["spec"]["containers"][1]["name"], "side");

    // Pods are immutable but for images.
    let changed_env = manifest("two", "wa-session:2").replace("value: \"1\"", "value: \"2\"");
    let out = kubectl.run_with_input(&["apply", "-f", "-"], Some(&changed_env)).await.unwrap();
    assert!(!out.success);
    assert!(out.stderr.contains("pod updates may not change fields other than"), "{}", out.stderr);

    // Pod names are unique.
    let out = kubectl.run_with_input(&["create", "-f", "-"], Some(&manifest("x", "other:1"))).await.unwrap();
    assert!(out.stderr.contains("AlreadyExists") && out.stderr.contains("pods \"p\" already exists"), "{}", out.stderr);

    // The built-in printers, label selectors and a collection delete.
    let table = kubectl.ok(&["get", "pods"]).await.unwrap();
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]);
    assert!(table.contains("0/2") && table.contains("Pending"), "{table}");
    kubectl.ok(&["label", "pod", "p", "tier=session"]).await.unwrap();
    let names = kubectl.ok(&["get", "pods,secrets", "-l", "app=wa,tier in (session)", "-o", "name"]).await.unwrap();
    assert_eq!(names.trim(), "pod/p");
    let out = kubectl.ok(&["delete", "pods,secrets", "-l", "app=wa"]).await.unwrap();
    assert!(out.contains("pod \"p\" deleted") && out.contains("secret \"hook\" deleted"), "{out}");
    let left = kubectl.ok(&["get", "pods,secrets", "-o", "name"]).await.unwrap();
    assert_eq!(left.trim(), "", "an unscheduled pod is deleted at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_leases_and_events() {
    let cluster = cluster().await;
    let kubectl = cluster.kubectl().unwrap();
    kubectl.ok(&["create", "namespace", "team"]).await.unwrap();
    kubectl.ok(&["-n", "team", "create", "configmap", "c", "--from-literal=a=b"]).await.unwrap();
    let lease = "apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata: {name: wa-operator, namespace: team}\nspec: {holderIdentity: op-0, leaseDurationSeconds: 15}\n";
    kubectl.apply(lease, &[]).await.unwrap();
    let table = kubectl.ok(&["-n", "team", "get", "leases"]).await.unwrap();
    assert!(table.contains("HOLDER") && table.contains("op-0"), "{table}");
    let out = kubectl.ok(&["delete", "namespace", "team", "--timeout=20s"]).await.unwrap();
    assert!(out.contains("namespace \"team\" deleted"), "{out}");
    let out = kubectl.run(&["get", "namespace", "team"]).await.unwrap();
    assert!(!out.success, "the namespace is gone once emptied");
    let out = kubectl.run(&["-n", "team", "get", "configmap", "c"]).await.unwrap();
    assert!(!out.success);

    // Events written through events.k8s.io/v1 (kube-rs's Recorder) are listed by kubectl.
    let recorder = kube::runtime::events::Recorder::new(cluster.client(), "wa-operator".into());
    let reference = k8s_openapi::api::core::v1::ObjectReference {
        kind: Some("Namespace".into()),
        name: Some("default".into()),
        namespace: Some("default".into()),
        api_version: Some("v1".into()),
        ..Default::default()
    };
    let event = kube::runtime::events::Event {
        type_: kube::runtime::events::EventType::Normal,
        reason: "Tested".into(),
        note: Some("recorded by kube-rs".into()),
        action: "Test".into(),
        secondary: None,
    };
    recorder.publish(&event, &reference).await.unwrap();
    let events = kubectl.ok(&["get", "events"]).await.unwrap();
    assert!(events.contains("Tested") && events.contains("recorded by kube-rs"), "{events}");
}
