//! Wiring: the kube-rs `Controller`, leader election, the HTTP port, shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::controller::{self, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{PredicateConfig, WatchStreamExt, reflector, watcher};
use kube::{Client, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use wa_api::WhatsAppSession;

use crate::desired::{MANAGED_SELECTOR, PodSettings};
use crate::http::{self, Health};
use crate::leader::{LeaderElector, LeaseSettings, run_while_leading};
use crate::metrics::Metrics;
use crate::pod_api::PodApi;
use crate::reconcile::{Context, Timing, error_policy, reconcile};
use crate::status_watch::{PodStatusWatch, Trigger};

/// The operator's configuration, built from its flags (`cli.rs`).
#[derive(Debug, Clone)]
pub struct Config {
    /// Watch one namespace, or all when `None`.
    pub namespace: Option<String>,
    pub pod_settings: PodSettings,
    pub metrics_addr: SocketAddr,
    /// `None` runs without leader election (one replica only).
    pub lease: Option<LeaseSettings>,
    /// This replica's name in Events and the Lease.
    pub identity: String,
    /// Reconciles running at once.
    pub concurrency: u16,
    /// The session pods' API port.
    pub pod_port: u16,
    /// How long a pod may hold a status long poll.
    pub status_wait: Duration,
    pub timing: Timing,
}

/// What a change to a session must touch to be reconciled: its spec (generation), its
/// finalizers, or its deletion. Status-only updates (the operator's own writes, one per
/// phase change) are filtered out, which saves a reconcile per write; the store still
/// gets them, so the next reconcile reads the current status.
fn spec_or_lifecycle(s: &WhatsAppSession) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.metadata.generation.hash(&mut h);
    s.metadata.finalizers.hash(&mut h);
    s.metadata.deletion_timestamp.is_some().hash(&mut h);
    // A re-created object with the same name is a new object.
    s.metadata.uid.hash(&mut h);
    Some(h.finish())
}

/// Runs the controller until `shutdown` (in-flight reconciles finish first).
pub async fn run_controller(
    ctx: Arc<Context>,
    trigger: Trigger,
    namespace: Option<&str>,
    concurrency: u16,
    shutdown: CancellationToken,
) {
    let client = ctx.client.clone();
    let (sessions, pods): (Api<WhatsAppSession>, Api<Pod>) = match namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client, ns),
        ),
        None => (Api::all(client.clone()), Api::all(client)),
    };
    let (reader, writer) = reflector::store();
    let sessions = watcher(sessions, watcher::Config::default().any_semantic())
        // Nothing reads managedFields; a fleet of sessions need not keep them in memory.
        .modify(|s: &mut WhatsAppSession| s.managed_fields_mut().clear())
        .reflect(writer)
        .applied_objects()
        .predicate_filter(spec_or_lifecycle, PredicateConfig::default());
    Controller::for_stream(sessions, reader)
        // Pod changes (ready, deleted, failed) reconcile the owning session.
        .owns(
            pods,
            watcher::Config::default()
                .labels(MANAGED_SELECTOR)
                .any_semantic(),
        )
        // A session pod reported a new status (status_watch).
        .reconcile_on(trigger)
        .with_config(controller::Config::default().concurrency(concurrency))
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(reconcile, error_policy, ctx)
        .for_each(|result| {
            match result {
                Ok((obj, _)) => debug!(session = %obj.name, "reconciled"),
                Err(e) => debug!(error = %e, "reconcile did not complete"),
            }
            std::future::ready(())
        })
        .await;
}

/// The whole operator: HTTP port, then (while leading) the controller, until `shutdown`.
pub async fn run(
    client: Client,
    config: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(Health::default());
    let listener = tokio::net::TcpListener::bind(config.metrics_addr)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on --metrics-addr {}: {e}",
                config.metrics_addr
            )
        })?;
    info!(addr = %listener.local_addr()?, "serving /metrics, /healthz, /readyz");
    let server = {
        let app = http::app(metrics.clone(), health.clone());
        let stop = shutdown.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
        })
    };

    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "wa-operator".to_owned(),
            instance: Some(config.identity.clone()),
        },
    );
    // One term of leadership: a fresh context (caches, status polls) each time.
    let term = {
        let (client, metrics, config) = (client.clone(), metrics.clone(), config.clone());
        move |stop: CancellationToken| {
            let (watch, trigger) = PodStatusWatch::new(
                PodApi::new(config.pod_port),
                config.status_wait,
                metrics.clone(),
            );
            let ctx = Arc::new(Context::new(
                client.clone(),
                recorder.clone(),
                metrics.clone(),
                config.pod_settings.clone(),
                PodApi::new(config.pod_port),
                watch.clone(),
                config.timing,
            ));
            let namespace = config.namespace.clone();
            let concurrency = config.concurrency;
            let metrics = metrics.clone();
            async move {
                run_controller(ctx, trigger, namespace.as_deref(), concurrency, stop).await;
                watch.clear();
                metrics.forget_all_sessions();
            }
        }
    };

    let result = match config.lease.clone() {
        Some(lease) => {
            info!(lease = %lease.name, namespace = %lease.namespace, identity = %lease.identity, "leader election on");
            let elector = LeaderElector::new(client, lease);
            let health = health.clone();
            run_while_leading(
                elector,
                shutdown.clone(),
                &metrics,
                move |ok| health.set_api_reachable(ok),
                term,
            )
            .await
        }
        None => {
            warn!("leader election off: run exactly one replica");
            // Readiness without a lease: the API answers a cheap call.
            health.set_api_reachable(client.apiserver_version().await.is_ok());
            metrics.set_leader(true);
            term(shutdown.clone()).await;
            Ok(())
        }
    };
    shutdown.cancel();
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(error = %e, "HTTP server ended with an error"),
        Err(e) => warn!(error = %e, "HTTP server task failed"),
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::{SessionRef, session_pod, token_fingerprint};
    use crate::testing::FakeApi;
    use axum::routing::get;
    use axum::{Json, Router};
    use serde_json::{Value, json};
    use std::sync::Mutex;
    use std::time::Instant;

    #[test]
    fn status_only_changes_do_not_trigger_a_reconcile() {
        let base: WhatsAppSession = serde_json::from_value(json!({
            "apiVersion": "wa-operator.dev/v1alpha1", "kind": "WhatsAppSession",
            "metadata": {"name": "s", "namespace": "wa", "uid": "u1", "generation": 1, "resourceVersion": "5"},
            "spec": {}})).unwrap();
        let key = spec_or_lifecycle(&base);
        let changed = |f: &dyn Fn(&mut WhatsAppSession)| {
            let mut s = base.clone();
            f(&mut s);
            spec_or_lifecycle(&s) != key
        };
        assert!(!changed(&|s| {
            s.status = Some(Default::default());
            s.metadata.resource_version = Some("6".into());
        }));
        assert!(!changed(
            &|s| s.metadata.labels = Some([("a".to_owned(), "b".to_owned())].into())
        ));
        assert!(changed(&|s| s.metadata.generation = Some(2)));
        assert!(changed(
            &|s| s.metadata.finalizers = Some(vec![wa_api::names::FINALIZER.to_owned()])
        ));
        assert!(changed(&|s| s.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now()
            ))));
        assert!(changed(&|s| s.metadata.uid = Some("u2".into())));
    }

    /// The whole loop on the real kube-rs `Controller`: list → reconcile → status long poll →
    /// `reconcile_on` → status. The fake API answers lists and holds watches quiet, so every
    /// reconcile after the first one here comes from the pod's status report.
    #[tokio::test]
    async fn a_phase_change_in_the_pod_reaches_the_status_through_the_controller() {
        let pod_status = Arc::new(Mutex::new(json!({"session": "s", "engine": "sandbox",
            "phase": "AwaitingScan", "since": "2025-01-01T00:00:00Z", "version": 1})));
        let app = {
            let st = pod_status.clone();
            Router::new().route(
                "/v1/status",
                get(move || {
                    let st = st.clone();
                    async move { Json(st.lock().unwrap().clone()) }
                }),
            )
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

        let (client, fake) = FakeApi::start();
        let session = json!({"apiVersion": "wa-operator.dev/v1alpha1", "kind": "WhatsAppSession",
            "metadata": {"name": "s", "namespace": "wa", "uid": "u1", "generation": 1,
                         "finalizers": [wa_api::names::FINALIZER]},
            "spec": {"engine": "sandbox"}});
        fake.put(session.clone());
        // The session's children already exist and its pod is ready (an operator restart).
        let settings = PodSettings::new("img:1", None);
        let typed: WhatsAppSession = serde_json::from_value(session).unwrap();
        let sref = SessionRef::of(&typed).unwrap();
        fake.put(serde_json::to_value(crate::desired::token_secret(&sref, "tok")).unwrap());
        fake.put(
            serde_json::to_value(crate::desired::auth_pvc(&sref, &typed.spec.storage)).unwrap(),
        );
        let mut pod: Value = serde_json::to_value(session_pod(
            &sref,
            &typed.spec,
            &settings,
            &token_fingerprint("tok"),
        ))
        .unwrap();
        pod["status"] = json!({"phase": "Running", "podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]});
        fake.put(pod);

        let metrics = Arc::new(Metrics::default());
        let (watch, trigger) =
            PodStatusWatch::new(PodApi::new(port), Duration::from_secs(5), metrics.clone());
        let ctx = Arc::new(Context::new(
            client.clone(),
            Recorder::new(client, "wa-operator".into()),
            metrics.clone(),
            settings,
            PodApi::new(port),
            watch,
            Timing::default(),
        ));
        let stop = CancellationToken::new();
        let controller = tokio::spawn(run_controller(ctx, trigger, Some("wa"), 4, stop.clone()));

        let phase = || {
            fake.get("whatsappsessions", "wa", "s")
                .and_then(|s| s["status"]["phase"].as_str().map(str::to_owned))
        };
        let wait_for = |want: &'static str| {
            let phase = &phase;
            async move {
                let deadline = Instant::now() + Duration::from_secs(10);
                while phase().as_deref() != Some(want) {
                    assert!(
                        Instant::now() < deadline,
                        "phase {:?}, wanted {want}",
                        phase()
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        wait_for("AwaitingScan").await;
        {
            let mut s = pod_status.lock().unwrap();
            s["phase"] = json!("Connected");
            s["account"] = json!({"jid": "15551234567@s.whatsapp.net"});
            s["version"] = json!(2);
        }
        wait_for("Connected").await;
        assert_eq!(
            metrics
                .render()
                .lines()
                .find(|l| l.starts_with("wa_operator_sessions{phase=\"Connected\"}")),
            Some("wa_operator_sessions{phase=\"Connected\"} 1")
        );
        // No pod was created or deleted: the existing one was adopted as is.
        assert!(
            fake.writes().iter().all(|w| !w.contains("pods/")),
            "{:?}",
            fake.writes()
        );
        let verbs: Vec<_> = fake
            .calls()
            .iter()
            .filter(|c| matches!(c.verb, "list" | "watch"))
            .map(|c| format!("{} {}", c.verb, c.resource))
            .collect();
        for v in [
            "list whatsappsessions",
            "watch whatsappsessions",
            "list pods",
            "watch pods",
        ] {
            assert!(verbs.iter().any(|x| x == v), "{v} missing in {verbs:?}");
        }
        fake.assert_rbac();

        stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), controller)
            .await
            .expect("graceful shutdown")
            .unwrap();
    }
}
