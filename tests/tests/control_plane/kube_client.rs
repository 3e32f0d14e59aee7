//! kube-rs against the emulator: watches, reflectors, the Controller runtime, server-side
//! apply, patches, subresources, finalizers, garbage collection, selectors, pagination,
//! leases and errors, as against a real API server.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::controller::Action;
use kube::runtime::{Controller, WatchStreamExt, reflector, watcher};
use kube::{Resource, ResourceExt};
use serde_json::json;
use wa_api::crd::WhatsAppSession;
use wa_tests::apiserver::ControlPlaneConfig;
use wa_tests::process::wait_until;
use wa_tests::{TestCluster, TestClusterConfig};

use crate::{WAIT, api_only, create_session, session, sessions};

fn typed(client: &kube::Client) -> Api<WhatsAppSession> {
    Api::namespaced(client.clone(), "default")
}

fn api_error(err: kube::Error) -> (u16, String, String) {
    match err {
        kube::Error::Api(status) => (status.code, status.reason.clone(), status.message.clone()),
        other => panic!("expected an API error, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflectors_follow_lists_and_watches() {
    let cluster = api_only().await;
    let client = cluster.client();
    create_session(&client, "before", json!({"engine": "sandbox"})).await;
    for streaming in [false, true] {
        let config = if streaming { watcher::Config::default().streaming_lists() } else { watcher::Config::default() };
        let (reader, writer) = reflector::store::<WhatsAppSession>();
        let stream = reflector(writer, watcher(typed(&client), config)).applied_objects();
        let task = tokio::spawn(async move {
            futures::pin_mut!(stream);
            while stream.try_next().await.is_ok() {}
        });
        tokio::time::timeout(WAIT, reader.wait_until_ready()).await.unwrap().unwrap();
        assert!(reader.get(&reflector::ObjectRef::new("before").within("default")).is_some(), "streaming={streaming}");
        let name = format!("after-{streaming}");
        create_session(&client, &name, json!({})).await;
        let patch = json!({"spec": {"suspend": true}});
        typed(&client).patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
        wait_until(WAIT, "the reflector to see the patch", || {
            let found = reader.get(&reflector::ObjectRef::new(&name).within("default"));
            async move { found.filter(|s| s.spec.suspend).map(|_| ()) }
        })
        .await
        .unwrap();
        typed(&client).delete(&name, &DeleteParams::default()).await.unwrap();
        wait_until(WAIT, "the reflector to see the deletion", || {
            let gone = reader.get(&reflector::ObjectRef::new(&name).within("default")).is_none();
            async move { gone.then_some(()) }
        })
        .await
        .unwrap();
        task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_resume_from_a_version_and_expire_old_ones() {
    let config = TestClusterConfig {
        control_plane: ControlPlaneConfig {
            history_capacity: 16,
            ..ControlPlaneConfig::default()
        },
        ..TestClusterConfig::default().without_pod_runner()
    };
    let cluster = TestCluster::start_with(config).await.unwrap();
    cluster.install_crd().await.unwrap();
    let client = cluster.client();
    let api = typed(&client);
    let first = create_session(&client, "a", json!({})).await;
    let from = first.resource_version().unwrap();
    create_session(&client, "b", json!({})).await;
    api.patch("a", &PatchParams::default(), &Patch::Merge(&json!({"spec": {"suspend": true}}))).await.unwrap();
    api.delete("b", &DeleteParams::default()).await.unwrap();

    // Resuming after "a" was created replays exactly what happened since.
    let params = WatchParams::default().timeout(2);
    let events: Vec<WatchEvent<WhatsAppSession>> = api.watch(&params, &from).await.unwrap().take(3).try_collect().await.unwrap();
    let seen: Vec<String> = events
        .iter()
        .map(|e| match e {
            WatchEvent::Added(s) => format!("ADDED {}", s.name_any()),
            WatchEvent::Modified(s) => format!("MODIFIED {} suspend={}", s.name_any(), s.spec.suspend),
            WatchEvent::Deleted(s) => format!("DELETED {}", s.name_any()),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(seen, ["ADDED b", "MODIFIED a suspend=true", "DELETED b"]);

    // Push the start out of the bounded history: the watch answers 410 Gone, as an event.
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    for i in 0..20 {
        let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": format!("c{i}")}})).unwrap();
        cms.create(&PostParams::default(), &cm).await.unwrap();
    }
    let mut stream = api.watch(&params, &from).await.unwrap().boxed();
    match stream.next().await {
        Some(Ok(WatchEvent::Error(status))) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
            assert!(status.message.starts_with("too old resource version"), "{}", status.message);
        }
        other => panic!("expected a 410 error event, got {other:?}"),
    }
    assert!(stream.next().await.is_none(), "the watch ends after the error");

    // A list at an exact version that is not the current one is gone too.
    let err = api.list(&ListParams::default().at(&from).matching(kube::api::VersionMatch::Exact)).await.unwrap_err();
    assert_eq!(api_error(err).0, 410);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_get_bookmarks_when_they_ask() {
    let config = TestClusterConfig {
        control_plane: ControlPlaneConfig {
            bookmark_interval: Duration::from_millis(200),
            ..ControlPlaneConfig::default()
        },
        ..TestClusterConfig::default().without_pod_runner()
    };
    let cluster = TestCluster::start_with(config).await.unwrap();
    cluster.install_crd().await.unwrap();
    let api = typed(&cluster.client());
    let created = create_session(&cluster.client(), "a", json!({})).await;
    let rv = created.resource_version().unwrap();
    let mut stream = api.watch(&WatchParams::default().timeout(5), &rv).await.unwrap().boxed();
    match tokio::time::timeout(Duration::from_secs(3), stream.next()).await.unwrap() {
        Some(Ok(WatchEvent::Bookmark(b))) => assert_eq!(b.metadata.resource_version, rv),
        other => panic!("expected a bookmark, got {other:?}"),
    }
    // Without bookmarks asked for, none come: the stream just ends at its timeout.
    let quiet = WatchParams::default().disable_bookmarks().timeout(1);
    let events: Vec<_> = api.watch(&quiet, &rv).await.unwrap().collect().await;
    assert!(events.is_empty(), "{events:?}");
    // Streaming lists end their initial events with a marked bookmark.
    let streaming = WatchParams::default().initial_events().timeout(2);
    let events: Vec<WatchEvent<WhatsAppSession>> = api.watch(&streaming, "0").await.unwrap().take(2).try_collect().await.unwrap();
    assert!(matches!(&events[0], WatchEvent::Added(s) if s.name_any() == "a"));
    match &events[1] {
        WatchEvent::Bookmark(b) => assert!(b.metadata.annotations.contains_key("k8s.io/initial-events-end")),
        other => panic!("expected the initial-events-end bookmark, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_side_apply_tracks_field_owners() {
    let cluster = api_only().await;
    let client = cluster.client();
    let api = sessions(&client, "default");
    let ours = session("a", json!({"engine": "sandbox", "suspend": true}));
    let applied = api.patch("a", &PatchParams::apply("wa-operator"), &Patch::Apply(&ours)).await.unwrap();
    assert_eq!(applied.data["spec"]["rateLimit"]["burst"], 5, "created by apply, with defaults");
    // Same values from another manager: co-owned, no conflict.
    api.patch("a", &PatchParams::apply("kubectl"), &Patch::Apply(&session("a", json!({"engine": "sandbox"})))).await.unwrap();
    // A different value conflicts with both owners.
    let theirs = session("a", json!({"engine": "whatsapp"}));
    let err = api.patch("a", &PatchParams::apply("helm"), &Patch::Apply(&theirs)).await.unwrap_err();
    let (code, reason, message) = api_error(err);
    assert_eq!((code, reason.as_str()), (409, "Conflict"));
    assert!(message.contains("conflict with \"wa-operator\": .spec.engine") && message.contains("conflict with \"kubectl\""), "{message}");
    let forced = api.patch("a", &PatchParams::apply("helm").force(), &Patch::Apply(&theirs)).await.unwrap();
    assert_eq!(forced.data["spec"]["engine"], "whatsapp");
    // wa-operator applies nothing any more: it owns no field, its entry goes, and `suspend`
    // (which only it owned) is removed and so defaulted again.
    let shorter = json!({"apiVersion": "wa-operator.dev/v1alpha1", "kind": "WhatsAppSession", "metadata": {"name": "a"}});
    let after = api.patch("a", &PatchParams::apply("wa-operator"), &Patch::Apply(&shorter)).await.unwrap();
    let owners: Vec<String> = after.managed_fields().iter().filter_map(|m| m.manager.clone()).collect();
    assert!(owners.contains(&"helm".to_owned()) && !owners.contains(&"wa-operator".to_owned()), "{owners:?}");
    assert_eq!(after.data["spec"]["suspend"], false);
    // Status is applied through its subresource, with its own owner.
    let status = json!({"apiVersion": "wa-operator.dev/v1alpha1", "kind": "WhatsAppSession", "metadata": {"name": "a"},
        "status": {"phase": "Pending", "observedGeneration": 1}});
    let after = api.patch_status("a", &PatchParams::apply("wa-operator").force(), &Patch::Apply(&status)).await.unwrap();
    assert_eq!(after.data["status"]["phase"], "Pending");
    let status_owner = after.managed_fields().iter().find(|m| m.subresource.as_deref() == Some("status")).cloned().unwrap();
    assert_eq!(status_owner.manager.as_deref(), Some("wa-operator"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_json_and_strategic_patches() {
    let cluster = api_only().await;
    let client = cluster.client();
    let api = typed(&client);
    create_session(&client, "a", json!({"webhooks": [{"url": "https://x.example/1"}]})).await;
    let merged = api
        .patch("a", &PatchParams::default(), &Patch::Merge(&json!({"spec": {"phoneNumber": "+15551234567", "webhooks": null}})))
        .await
        .unwrap();
    assert_eq!(merged.spec.phone_number.as_deref(), Some("+15551234567"));
    assert!(merged.spec.webhooks.is_empty());
    let ops: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/spec/engine", "value": "whatsapp"},
        {"op": "replace", "path": "/spec/engine", "value": "sandbox"}])).unwrap();
    let patched = api.patch("a", &PatchParams::default(), &Patch::<()>::Json(ops)).await.unwrap();
    assert_eq!(patched.spec.engine, wa_api::crd::Engine::Sandbox);
    let failing: json_patch::Patch = serde_json::from_value(json!([{"op": "test", "path": "/spec/engine", "value": "whatsapp"}])).unwrap();
    let err = api.patch("a", &PatchParams::default(), &Patch::<()>::Json(failing)).await.unwrap_err();
    assert_eq!(api_error(err).0, 422);
    // Strategic merge is for built-in kinds only.
    let err = api.patch("a", &PatchParams::default(), &Patch::Strategic(json!({"spec": {"suspend": true}}))).await.unwrap_err();
    assert_eq!(api_error(err).0, 415);
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": {"containers": [
        {"name": "a", "image": "a:1"}, {"name": "b", "image": "b:1"}]}})).unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let patched = pods
        .patch("p", &PatchParams::default(), &Patch::Strategic(json!({"spec": {"containers": [{"name": "b", "image": "b:2"}]}})))
        .await
        .unwrap();
    let images: Vec<String> = patched.spec.unwrap().containers.into_iter().map(|c| c.image.unwrap()).collect();
    assert_eq!(images, ["a:1", "b:2"], "containers merge by name");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_and_the_status_subresource() {
    let cluster = api_only().await;
    let client = cluster.client();
    let api = typed(&client);
    let created = create_session(&client, "a", json!({})).await;
    assert_eq!(created.metadata.generation, Some(1));
    // Status written on create is dropped; the status endpoint ignores spec.
    let with_status = api
        .patch_status("a", &PatchParams::default(), &Patch::Merge(&json!({"status": {"phase": "Starting"}, "spec": {"suspend": true}})))
        .await
        .unwrap();
    assert_eq!(with_status.status.as_ref().and_then(|s| s.phase), Some(wa_api::crd::Phase::Starting));
    assert!(!with_status.spec.suspend);
    assert_eq!(with_status.metadata.generation, Some(1));
    // The main endpoint ignores status and bumps the generation on spec changes only.
    let mut obj = with_status.clone();
    obj.spec.suspend = true;
    obj.status = None;
    let replaced = api.replace("a", &PostParams::default(), &obj).await.unwrap();
    assert_eq!(replaced.metadata.generation, Some(2));
    assert_eq!(replaced.status.and_then(|s| s.phase), Some(wa_api::crd::Phase::Starting));
    let labelled = api.patch("a", &PatchParams::default(), &Patch::Merge(&json!({"metadata": {"labels": {"x": "y"}}}))).await.unwrap();
    assert_eq!(labelled.metadata.generation, Some(2));
    // Stale writes conflict.
    let err = api.replace("a", &PostParams::default(), &obj).await.unwrap_err();
    let (code, reason, _) = api_error(err);
    assert_eq!((code, reason.as_str()), (409, "Conflict"));
    let err = api.replace_status("a", &PostParams::default(), &obj).await.unwrap_err();
    assert_eq!(api_error(err).0, 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finalizers_and_garbage_collection() {
    let cluster = api_only().await;
    let client = cluster.client();
    let api = typed(&client);
    let mut owner = create_session(&client, "owner", json!({})).await;
    owner.metadata.finalizers = Some(vec![wa_api::names::FINALIZER.into()]);
    let owner = api.replace("owner", &PostParams::default(), &owner).await.unwrap();
    let owner_ref = owner.controller_owner_ref(&()).unwrap();
    let secrets: Api<Secret> = Api::default_namespaced(client.clone());
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let mut secret: Secret = serde_json::from_value(json!({"metadata": {"name": "wa-owner-token"}, "stringData": {"token": "t"}})).unwrap();
    secret.metadata.owner_references = Some(vec![owner_ref.clone()]);
    secrets.create(&PostParams::default(), &secret).await.unwrap();
    let mut cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "grandchild"}})).unwrap();
    let secret_now = secrets.get("wa-owner-token").await.unwrap();
    cm.metadata.owner_references = Some(vec![secret_now.controller_owner_ref(&()).unwrap()]);
    cms.create(&PostParams::default(), &cm).await.unwrap();

    // The finalizer holds the owner, and with it its dependents.
    let pending = api.delete("owner", &DeleteParams::default()).await.unwrap();
    let pending = pending.left().expect("still there while the finalizer is");
    assert!(pending.metadata.deletion_timestamp.is_some());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(secrets.get_opt("wa-owner-token").await.unwrap().is_some());
    // kube-rs's finalizer helper removes it; then background cascading deletes the chain.
    let removal = json!({"metadata": {"finalizers": null}});
    api.patch("owner", &PatchParams::default(), &Patch::Merge(&removal)).await.unwrap();
    wait_until(WAIT, "the cascade to delete the secret and its configmap", || {
        let (secrets, cms) = (secrets.clone(), cms.clone());
        async move {
            let gone = secrets.get_opt("wa-owner-token").await.ok()?.is_none() && cms.get_opt("grandchild").await.ok()?.is_none();
            gone.then_some(())
        }
    })
    .await
    .unwrap();

    // Foreground: the owner waits for its dependents; orphan: dependents stay.
    let fg = create_session(&client, "fg", json!({})).await;
    let mut held: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "held", "finalizers": ["example.com/hold"]}})).unwrap();
    held.metadata.owner_references = Some(vec![fg.controller_owner_ref(&()).unwrap()]);
    cms.create(&PostParams::default(), &held).await.unwrap();
    api.delete("fg", &DeleteParams::foreground()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(api.get_opt("fg").await.unwrap().is_some(), "foreground deletion waits for dependents");
    cms.patch("held", &PatchParams::default(), &Patch::Merge(&json!({"metadata": {"finalizers": null}}))).await.unwrap();
    wait_until(WAIT, "the foreground deletion to finish", || {
        let api = api.clone();
        async move { api.get_opt("fg").await.ok()?.is_none().then_some(()) }
    })
    .await
    .unwrap();
    let orphaner = create_session(&client, "orphaner", json!({})).await;
    let mut kept: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "kept"}})).unwrap();
    kept.metadata.owner_references = Some(vec![orphaner.controller_owner_ref(&()).unwrap()]);
    cms.create(&PostParams::default(), &kept).await.unwrap();
    api.delete("orphaner", &DeleteParams::orphan()).await.unwrap();
    wait_until(WAIT, "the orphaning to finish", || {
        let api = api.clone();
        async move { api.get_opt("orphaner").await.ok()?.is_none().then_some(()) }
    })
    .await
    .unwrap();
    let kept = cms.get("kept").await.unwrap();
    assert!(kept.metadata.owner_references.unwrap_or_default().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn label_and_field_selectors() {
    let cluster = api_only().await;
    let client = cluster.client();
    let api = typed(&client);
    for (name, tier) in [("a", "session"), ("b", "session"), ("c", "gateway")] {
        let mut obj = session(name, json!({}));
        obj["metadata"]["labels"] = json!({"tier": tier, "app": "wa"});
        api.create(&PostParams::default(), &serde_json::from_value(obj).unwrap()).await.unwrap();
    }
    let names = |list: kube::core::ObjectList<WhatsAppSession>| -> Vec<String> { list.items.iter().map(|s| s.name_any()).collect() };
    let cases = [
        ("tier=session", vec!["a", "b"]),
        ("tier!=session", vec!["c"]),
        ("tier in (gateway, other)", vec!["c"]),
        ("tier notin (gateway)", vec!["a", "b"]),
        ("app", vec!["a", "b", "c"]),
        ("!app", vec![]),
        ("app=wa,tier=gateway", vec!["c"]),
    ];
    for (selector, expected) in cases {
        let got = names(api.list(&ListParams::default().labels(selector)).await.unwrap());
        assert_eq!(got, expected, "{selector}");
    }
    assert_eq!(names(api.list(&ListParams::default().fields("metadata.name=b")).await.unwrap()), ["b"]);
    assert_eq!(names(api.list(&ListParams::default().fields("metadata.name!=b,metadata.namespace=default")).await.unwrap()), ["a", "c"]);
    let err = api.list(&ListParams::default().fields("spec.engine=sandbox")).await.unwrap_err();
    let (code, _, message) = api_error(err);
    assert_eq!((code, message.as_str()), (400, "field label not supported: spec.engine"));
    let err = api.list(&ListParams::default().labels("tier in gateway")).await.unwrap_err();
    assert_eq!(api_error(err).0, 400);
    // A watch with a selector sees objects enter and leave it.
    let mut stream = api.watch(&WatchParams::default().labels("tier=session").disable_bookmarks().timeout(3), "0").await.unwrap().boxed();
    for _ in 0..2 {
        assert!(matches!(stream.next().await, Some(Ok(WatchEvent::Added(_)))));
    }
    api.patch("a", &PatchParams::default(), &Patch::Merge(&json!({"metadata": {"labels": {"tier": "gateway"}}}))).await.unwrap();
    match stream.next().await {
        Some(Ok(WatchEvent::Deleted(s))) => assert_eq!(s.name_any(), "a"),
        other => panic!("leaving the selector should look like a deletion, got {other:?}"),
    }
    // deletecollection with a selector deletes exactly what it selects.
    let deleted = api.delete_collection(&DeleteParams::default(), &ListParams::default().labels("tier=gateway")).await.unwrap();
    let deleted: Vec<String> = deleted.left().unwrap().items.iter().map(|s| s.name_any()).collect();
    assert_eq!(deleted, ["a", "c"]);
    assert_eq!(names(api.list(&ListParams::default()).await.unwrap()), ["b"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_paginate_over_one_snapshot() {
    let cluster = api_only().await;
    let client = cluster.client();
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    for i in 0..25 {
        let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": format!("c{i:02}")}})).unwrap();
        cms.create(&PostParams::default(), &cm).await.unwrap();
    }
    let first = cms.list(&ListParams::default().limit(10)).await.unwrap();
    assert_eq!(first.items.len(), 10);
    assert_eq!(first.metadata.remaining_item_count, Some(15));
    let token = first.metadata.continue_.clone().unwrap();
    // Changes after the first page do not show in later pages.
    cms.delete("c24", &DeleteParams::default()).await.unwrap();
    let second = cms.list(&ListParams::default().limit(10).continue_token(&token)).await.unwrap();
    let third = cms.list(&ListParams::default().limit(10).continue_token(second.metadata.continue_.as_deref().unwrap())).await.unwrap();
    assert_eq!(third.items.len(), 5);
    assert!(third.metadata.continue_.as_deref().unwrap_or("").is_empty());
    assert_eq!(third.items.last().unwrap().name_any(), "c24");
    assert_eq!(second.metadata.resource_version, first.metadata.resource_version);
    let err = cms.list(&ListParams::default().limit(10).continue_token(&token)).await.unwrap_err();
    assert_eq!(api_error(err).0, 410, "a used or unknown continue token is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_optimistic_and_errors_read_like_kubernetes() {
    let cluster = api_only().await;
    let client = cluster.client();
    let leases: Api<Lease> = Api::default_namespaced(client.clone());
    let lease: Lease = serde_json::from_value(json!({"metadata": {"name": "wa-operator"},
        "spec": {"holderIdentity": "op-0", "leaseDurationSeconds": 15, "renewTime": "2025-01-01T00:00:00.000000Z"}})).unwrap();
    let created = leases.create(&PostParams::default(), &lease).await.unwrap();
    let mut renewed = created.clone();
    renewed.spec.as_mut().unwrap().renew_time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(k8s_openapi::jiff::Timestamp::now()));
    leases.replace("wa-operator", &PostParams::default(), &renewed).await.unwrap();
    let mut stale = created.clone();
    stale.spec.as_mut().unwrap().holder_identity = Some("op-1".into());
    let err = leases.replace("wa-operator", &PostParams::default(), &stale).await.unwrap_err();
    assert_eq!(api_error(err).1, "Conflict", "a second replica with a stale version loses");

    let err = leases.create(&PostParams::default(), &lease).await.unwrap_err();
    assert_eq!(api_error(err), (409, "AlreadyExists".into(), "leases.coordination.k8s.io \"wa-operator\" already exists".into()));
    let err = typed(&client).get("nope").await.unwrap_err();
    assert_eq!(api_error(err), (404, "NotFound".into(), "whatsappsessions.wa-operator.dev \"nope\" not found".into()));
    let elsewhere: Api<ConfigMap> = Api::namespaced(client.clone(), "missing");
    let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "c"}})).unwrap();
    let err = elsewhere.create(&PostParams::default(), &cm).await.unwrap_err();
    assert_eq!(api_error(err).2, "namespaces \"missing\" not found");
    let invalid: WhatsAppSession = serde_json::from_value(session("bad", json!({"rateLimit": {"burst": 0, "messagesPerMinute": 30}}))).unwrap();
    let err = typed(&client).create(&PostParams::default(), &invalid).await.unwrap_err();
    let (code, reason, message) = api_error(err);
    assert_eq!((code, reason.as_str()), (422, "Invalid"));
    assert!(message.contains("spec.rateLimit.burst"), "{message}");
    let generated = typed(&client)
        .create(&PostParams::default(), &serde_json::from_value(json!({"apiVersion": "wa-operator.dev/v1alpha1", "kind": "WhatsAppSession",
            "metadata": {"generateName": "gen-"}, "spec": {}})).unwrap())
        .await
        .unwrap();
    assert!(generated.name_any().starts_with("gen-") && generated.name_any().len() == 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_runtime_reconciles_against_it() {
    let cluster = api_only().await;
    let client = cluster.client();
    let reconciles = Arc::new(AtomicUsize::new(0));

    struct Ctx {
        client: kube::Client,
        reconciles: Arc<AtomicUsize>,
    }
    async fn reconcile(s: Arc<WhatsAppSession>, ctx: Arc<Ctx>) -> Result<Action, kube::Error> {
        ctx.reconciles.fetch_add(1, Ordering::SeqCst);
        let ns = s.namespace().unwrap_or_default();
        let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
        let mut cm: ConfigMap = serde_json::from_value(json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": format!("wa-{}", s.name_any())}, "data": {"engine": s.spec.engine.as_str()}})).unwrap();
        cm.metadata.owner_references = Some(vec![s.controller_owner_ref(&()).unwrap()]);
        cms.patch(&cm.name_any(), &PatchParams::apply("wa-operator").force(), &Patch::Apply(&cm)).await?;
        let status = json!({"apiVersion": "wa-operator.dev/v1alpha1", "kind": "WhatsAppSession",
            "status": {"phase": "Pending", "observedGeneration": s.meta().generation}});
        Api::<WhatsAppSession>::namespaced(ctx.client.clone(), &ns)
            .patch_status(&s.name_any(), &PatchParams::apply("wa-operator").force(), &Patch::Apply(&status))
            .await?;
        Ok(Action::await_change())
    }
    fn error_policy(_: Arc<WhatsAppSession>, _: &kube::Error, _: Arc<Ctx>) -> Action {
        Action::requeue(Duration::from_millis(200))
    }
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        reconciles: reconciles.clone(),
    });
    let controller = Controller::new(typed(&client), watcher::Config::default())
        .owns(Api::<ConfigMap>::default_namespaced(client.clone()), watcher::Config::default())
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {});
    let task = tokio::spawn(controller);
    create_session(&client, "a", json!({"engine": "sandbox"})).await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    wait_until(WAIT, "the controller to create the owned configmap and the status", || {
        let (cms, api) = (cms.clone(), typed(&client));
        async move {
            let cm = cms.get_opt("wa-a").await.ok()??;
            let s = api.get("a").await.ok()?;
            (cm.data?.get("engine")? == "sandbox" && s.status?.observed_generation == Some(1)).then_some(())
        }
    })
    .await
    .unwrap();
    // Deleting the owned object triggers a reconcile that recreates it.
    cms.delete("wa-a", &DeleteParams::default()).await.unwrap();
    wait_until(WAIT, "the owned configmap to come back", || {
        let cms = cms.clone();
        async move { cms.get_opt("wa-a").await.ok()?.map(|_| ()) }
    })
    .await
    .unwrap();
    assert!(reconciles.load(Ordering::SeqCst) >= 2);
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_and_metadata_watches() {
    let cluster = api_only().await;
    let client = cluster.client();
    let discovery = kube::discovery::Discovery::new(client.clone()).run().await.unwrap();
    let groups: Vec<String> = discovery.groups().map(|g| g.name().to_owned()).collect();
    for g in ["", "coordination.k8s.io", "events.k8s.io", "apiextensions.k8s.io", "wa-operator.dev"] {
        assert!(groups.contains(&g.to_owned()), "{g} missing from {groups:?}");
    }
    let (ar, caps) = discovery.resolve_gvk(&kube::core::GroupVersionKind::gvk("wa-operator.dev", "v1alpha1", "WhatsAppSession")).unwrap();
    assert_eq!(ar.plural, "whatsappsessions");
    assert!(caps.subresources.iter().any(|(sub, _)| sub.plural == "whatsappsessions/status" || sub.plural == "status"), "{:?}", caps.subresources);
    let version = client.apiserver_version().await.unwrap();
    assert_eq!(version.major, "1");

    create_session(&client, "a", json!({})).await;
    let metadata: Api<kube::core::PartialObjectMeta<WhatsAppSession>> = Api::default_namespaced(client.clone());
    let stream = watcher(metadata, watcher::Config::default()).applied_objects();
    futures::pin_mut!(stream);
    let first = tokio::time::timeout(WAIT, stream.try_next()).await.unwrap().unwrap().unwrap();
    assert_eq!(first.name_any(), "a");
}
