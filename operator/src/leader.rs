//! Leader election on a `coordination.k8s.io/v1` Lease, so two replicas are safe: only the
//! holder reconciles.
//!
//! The algorithm is client-go's: a candidate takes the Lease when it is free or when its
//! record has not changed for `leaseDurationSeconds` *as observed on the candidate's own
//! clock* (so clock skew between nodes does not matter); the holder renews every `retry`
//! period with an optimistic-concurrency update (`resourceVersion`), and gives up leading
//! when it has not renewed for `renew_deadline`, which is shorter than the lease duration,
//! so it stops before anyone else may start. On shutdown the holder releases the Lease so a
//! standby takes over at once.

use std::future::Future;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::Metrics;

/// Where the Lease is and how it is held.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    pub name: String,
    pub namespace: String,
    /// This replica's identity (its pod name), written as `holderIdentity`.
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry: Duration,
}

impl LeaseSettings {
    /// client-go's defaults: 15 s lease, 10 s renew deadline, 2 s retry.
    pub fn new(
        name: impl Into<String>,
        namespace: impl Into<String>,
        identity: impl Into<String>,
    ) -> Self {
        Self {
            name: name.into(),
            namespace: namespace.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry: Duration::from_secs(2),
        }
    }
}

/// What to do with the Lease as found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// We hold it: renew.
    Renew,
    /// Free or expired: take it.
    TakeOver,
    /// Someone else holds it.
    Wait,
}

/// The pure part of the election. `unchanged_for` is how long the Lease record has looked
/// the same on our clock.
pub fn decide(
    holder: Option<&str>,
    me: &str,
    unchanged_for: Duration,
    lease_duration: Duration,
) -> Decision {
    match holder.filter(|h| !h.is_empty()) {
        Some(h) if h == me => Decision::Renew,
        None => Decision::TakeOver,
        Some(_) if unchanged_for >= lease_duration => Decision::TakeOver,
        Some(_) => Decision::Wait,
    }
}

/// The result of one round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Round {
    Leading,
    Following { holder: Option<String> },
}

pub struct LeaderElector {
    api: Api<Lease>,
    settings: LeaseSettings,
    /// The Lease record we last saw and when we first saw it that way.
    observed: Option<(LeaseSpec, Instant)>,
}

fn now_micro() -> MicroTime {
    MicroTime(Timestamp::now())
}

impl LeaderElector {
    pub fn new(client: kube::Client, settings: LeaseSettings) -> Self {
        Self {
            api: Api::namespaced(client, &settings.namespace),
            settings,
            observed: None,
        }
    }

    pub fn settings(&self) -> &LeaseSettings {
        &self.settings
    }

    /// One round: create, take over, renew, or observe. Conflicts (another replica wrote
    /// first) are not errors, just `Following`.
    pub async fn round(&mut self) -> Result<Round, kube::Error> {
        let s = &self.settings;
        let duration_secs = i32::try_from(s.lease_duration.as_secs()).unwrap_or(15);
        let Some(lease) = self.api.get_opt(&s.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(s.name.clone()),
                    namespace: Some(s.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(s.identity.clone()),
                    lease_duration_seconds: Some(duration_secs),
                    acquire_time: Some(now_micro()),
                    renew_time: Some(now_micro()),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Round::Leading),
                Err(kube::Error::Api(st)) if st.is_already_exists() || st.is_conflict() => {
                    Ok(Round::Following { holder: None })
                }
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let now = Instant::now();
        let since = match &self.observed {
            Some((seen, at)) if *seen == spec => *at,
            _ => now,
        };
        self.observed = Some((spec.clone(), since));
        // Honour the holder's own duration when it wrote one.
        let their_duration = spec
            .lease_duration_seconds
            .and_then(|d| u64::try_from(d).ok())
            .map(Duration::from_secs)
            .unwrap_or(s.lease_duration);
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        match decide(holder.as_deref(), &s.identity, now - since, their_duration) {
            Decision::Wait => Ok(Round::Following { holder }),
            decision => {
                let mut next = lease;
                let mut spec = spec;
                if decision == Decision::TakeOver {
                    spec.acquire_time = Some(now_micro());
                    spec.lease_transitions =
                        Some(spec.lease_transitions.unwrap_or(0) + i32::from(holder.is_some()));
                }
                spec.holder_identity = Some(s.identity.clone());
                spec.lease_duration_seconds = Some(duration_secs);
                spec.renew_time = Some(now_micro());
                next.spec = Some(spec);
                // `replace` sends our resourceVersion: if anyone wrote in between, 409.
                match self
                    .api
                    .replace(&s.name, &PostParams::default(), &next)
                    .await
                {
                    Ok(written) => {
                        self.observed = written.spec.map(|sp| (sp, Instant::now()));
                        Ok(Round::Leading)
                    }
                    Err(kube::Error::Api(st)) if st.is_conflict() => {
                        Ok(Round::Following { holder })
                    }
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Gives the Lease up if we hold it, so a standby need not wait for it to expire.
    pub async fn release(&mut self) -> Result<(), kube::Error> {
        let s = &self.settings;
        let Some(mut lease) = self.api.get_opt(&s.name).await? else {
            return Ok(());
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(s.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(now_micro());
        lease.spec = Some(spec);
        match self
            .api
            .replace(&s.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(st)) if st.is_conflict() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// A round bounded in time: a hanging API server must not keep us "leading".
    async fn bounded_round(&mut self) -> Result<Round, String> {
        let limit = self.settings.renew_deadline / 2;
        match tokio::time::timeout(limit, self.round()).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer from the API server within {limit:?}")),
        }
    }
}

/// Why leading ended.
#[derive(Debug, PartialEq, Eq)]
enum TermEnd {
    Shutdown,
    Lost,
    WorkEnded,
}

/// Runs `work` while this replica leads, until `shutdown`. `work` gets a token cancelled
/// for a graceful stop (shutdown); when leadership is lost it is aborted at once instead,
/// because another replica may start reconciling as soon as the lease expires.
/// `on_round` is told after each round whether the API server answered (readiness).
pub async fn run_while_leading<W, Fut>(
    mut elector: LeaderElector,
    shutdown: CancellationToken,
    metrics: &Metrics,
    on_round: impl Fn(bool),
    mut work: W,
) -> anyhow::Result<()>
where
    W: FnMut(CancellationToken) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let retry = elector.settings().retry;
    let deadline = elector.settings().renew_deadline;
    loop {
        // Candidate.
        loop {
            let round = elector.bounded_round().await;
            on_round(round.is_ok());
            match round {
                Ok(Round::Leading) => break,
                Ok(Round::Following { holder }) => {
                    tracing::debug!(?holder, "following");
                }
                Err(e) => warn!(error = %e, "lease round failed"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(retry) => {}
            }
        }
        info!(identity = %elector.settings().identity, lease = %elector.settings().name, "leading");
        metrics.set_leader(true);
        let term = shutdown.child_token();
        let mut task = tokio::spawn(work(term.clone()));
        let mut renewed = Instant::now();
        let mut finished = false;
        let end = loop {
            tokio::select! {
                // Shutdown first: it also stops the work (child token), and that must not
                // read as the work ending on its own.
                biased;
                () = shutdown.cancelled() => break TermEnd::Shutdown,
                _ = &mut task => {
                    finished = true;
                    break if shutdown.is_cancelled() { TermEnd::Shutdown } else { TermEnd::WorkEnded };
                }
                () = tokio::time::sleep(retry) => {}
            }
            let round = elector.bounded_round().await;
            on_round(round.is_ok());
            match round {
                Ok(Round::Leading) => renewed = Instant::now(),
                Ok(Round::Following { holder }) => {
                    warn!(?holder, "another replica took the lease");
                    break TermEnd::Lost;
                }
                Err(e) if renewed.elapsed() >= deadline => {
                    warn!(error = %e, "could not renew the lease before the deadline");
                    break TermEnd::Lost;
                }
                Err(e) => warn!(error = %e, "lease renewal failed; retrying"),
            }
        };
        metrics.set_leader(false);
        match end {
            TermEnd::Shutdown => {
                term.cancel();
                // Graceful: in-flight reconciles finish; bounded so shutdown stays prompt.
                if !finished
                    && tokio::time::timeout(Duration::from_secs(20), &mut task)
                        .await
                        .is_err()
                {
                    task.abort();
                }
                if let Err(e) = elector.release().await {
                    warn!(error = %e, "could not release the lease; it expires on its own");
                }
                return Ok(());
            }
            TermEnd::Lost => {
                term.cancel();
                task.abort();
                if !finished {
                    let _ = task.await;
                }
                info!("stopped leading; back to candidate");
            }
            TermEnd::WorkEnded => {
                let _ = elector.release().await;
                anyhow::bail!("the controller stopped while leading");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::FakeApi;
    use serde_json::json;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    fn settings(identity: &str) -> LeaseSettings {
        LeaseSettings::new("wa-operator", "ops", identity)
    }

    fn holder(fake: &FakeApi) -> Option<String> {
        let lease = fake.get("leases", "ops", "wa-operator")?;
        lease["spec"]["holderIdentity"].as_str().map(str::to_owned)
    }

    #[tokio::test]
    async fn two_replicas_one_leader_and_release_hands_over() {
        let (client, fake) = FakeApi::start();
        let mut a = LeaderElector::new(client.clone(), settings("a"));
        let mut b = LeaderElector::new(client, settings("b"));
        assert_eq!(a.round().await.unwrap(), Round::Leading);
        assert_eq!(
            b.round().await.unwrap(),
            Round::Following {
                holder: Some("a".into())
            }
        );
        assert_eq!(a.round().await.unwrap(), Round::Leading, "renewal");
        assert_eq!(
            b.round().await.unwrap(),
            Round::Following {
                holder: Some("a".into())
            }
        );
        a.release().await.unwrap();
        assert_eq!(holder(&fake), None);
        assert_eq!(
            b.round().await.unwrap(),
            Round::Leading,
            "a released lease is taken at once"
        );
        assert_eq!(
            a.round().await.unwrap(),
            Round::Following {
                holder: Some("b".into())
            }
        );
        let lease = fake.get("leases", "ops", "wa-operator").unwrap();
        assert_eq!(
            lease["spec"]["leaseTransitions"], 0,
            "taking a released lease is no transition from a holder"
        );
        // Releasing a lease one does not hold changes nothing.
        a.release().await.unwrap();
        assert_eq!(holder(&fake).as_deref(), Some("b"));
        fake.assert_rbac();
    }

    #[tokio::test]
    async fn an_expired_lease_is_taken_over_after_its_duration_on_our_clock() {
        let (client, fake) = FakeApi::start();
        // A holder that stopped renewing; its renewTime says nothing about our clock.
        fake.put(json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "wa-operator", "namespace": "ops"},
            "spec": {"holderIdentity": "gone", "leaseDurationSeconds": 1, "renewTime": "2020-01-01T00:00:00.000000Z",
                     "leaseTransitions": 3}}));
        let mut b = LeaderElector::new(client, settings("b"));
        assert_eq!(
            b.round().await.unwrap(),
            Round::Following {
                holder: Some("gone".into())
            }
        );
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(b.round().await.unwrap(), Round::Leading);
        let lease = fake.get("leases", "ops", "wa-operator").unwrap();
        assert_eq!(lease["spec"]["holderIdentity"], "b");
        assert_eq!(lease["spec"]["leaseTransitions"], 4);
        assert_eq!(lease["spec"]["leaseDurationSeconds"], 15);
    }

    #[tokio::test]
    async fn a_lease_that_keeps_being_renewed_is_never_taken() {
        let (client, fake) = FakeApi::start();
        let mut a = LeaderElector::new(client.clone(), settings("a"));
        let mut b = LeaderElector::new(client, settings("b"));
        a.round().await.unwrap();
        fake.edit("leases", "ops", "wa-operator", |l| {
            l["spec"]["leaseDurationSeconds"] = json!(1)
        });
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            a.round().await.unwrap();
            fake.edit("leases", "ops", "wa-operator", |l| {
                l["spec"]["leaseDurationSeconds"] = json!(1)
            });
            assert_eq!(
                b.round().await.unwrap(),
                Round::Following {
                    holder: Some("a".into())
                }
            );
        }
    }

    #[tokio::test]
    async fn a_conflicting_write_means_following() {
        let (client, fake) = FakeApi::start();
        let mut a = LeaderElector::new(client, settings("a"));
        a.round().await.unwrap();
        fake.fail("update", "leases", 409, "Conflict", 1);
        assert_eq!(
            a.round().await.unwrap(),
            Round::Following {
                holder: Some("a".into())
            }
        );
        fake.fail("create", "leases", 409, "AlreadyExists", 1);
        fake.remove("leases", "ops", "wa-operator");
        assert_eq!(a.round().await.unwrap(), Round::Following { holder: None });
    }

    fn fast(identity: &str) -> LeaseSettings {
        LeaseSettings {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_millis(400),
            retry: Duration::from_millis(50),
            ..settings(identity)
        }
    }

    async fn until(what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn work_runs_only_while_leading_and_stops_when_the_lease_is_lost() {
        let (client, fake) = FakeApi::start();
        let metrics = Arc::new(Metrics::default());
        let started = Arc::new(AtomicUsize::new(0));
        let shutdown = CancellationToken::new();
        let run = {
            let (started, metrics, shutdown) = (started.clone(), metrics.clone(), shutdown.clone());
            tokio::spawn(async move {
                let elector = LeaderElector::new(client, fast("a"));
                run_while_leading(
                    elector,
                    shutdown,
                    &metrics,
                    |_| {},
                    move |stop: CancellationToken| {
                        started.fetch_add(1, Ordering::SeqCst);
                        async move { stop.cancelled().await }
                    },
                )
                .await
            })
        };
        until("leading", || metrics.is_leader()).await;
        assert_eq!(started.load(Ordering::SeqCst), 1);

        // Another replica takes the lease (e.g. we were partitioned): stop at once.
        fake.edit("leases", "ops", "wa-operator", |l| {
            l["spec"]["holderIdentity"] = json!("b")
        });
        until("stepping down", || !metrics.is_leader()).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            started.load(Ordering::SeqCst),
            1,
            "no second term while b holds a fresh lease"
        );
        assert_eq!(holder(&fake).as_deref(), Some("b"));

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), run)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn shutdown_stops_work_gracefully_and_releases_the_lease() {
        let (client, fake) = FakeApi::start();
        let metrics = Metrics::default();
        let graceful = Arc::new(AtomicBool::new(false));
        let shutdown = CancellationToken::new();
        let stopper = {
            let shutdown = shutdown.clone();
            let fake = fake.clone();
            tokio::spawn(async move {
                until("a lease", || holder(&fake).as_deref() == Some("a")).await;
                shutdown.cancel();
            })
        };
        let g = graceful.clone();
        let elector = LeaderElector::new(client, fast("a"));
        let reached = Arc::new(AtomicBool::new(false));
        let r = reached.clone();
        tokio::time::timeout(
            Duration::from_secs(10),
            run_while_leading(
                elector,
                shutdown,
                &metrics,
                move |ok| r.store(ok, Ordering::SeqCst),
                move |stop: CancellationToken| {
                    let g = g.clone();
                    async move {
                        stop.cancelled().await;
                        g.store(true, Ordering::SeqCst);
                    }
                },
            ),
        )
        .await
        .unwrap()
        .unwrap();
        stopper.await.unwrap();
        assert!(
            graceful.load(Ordering::SeqCst),
            "work saw the graceful stop"
        );
        assert!(
            reached.load(Ordering::SeqCst),
            "rounds reported the API reachable"
        );
        assert_eq!(holder(&fake), None, "released");
        assert!(!metrics.is_leader());
    }

    #[tokio::test]
    async fn an_unreachable_api_server_ends_leading_after_the_renew_deadline() {
        let (client, fake) = FakeApi::start();
        let metrics = Arc::new(Metrics::default());
        let shutdown = CancellationToken::new();
        let run = {
            let (metrics, shutdown) = (metrics.clone(), shutdown.clone());
            tokio::spawn(async move {
                let elector = LeaderElector::new(client, fast("a"));
                run_while_leading(
                    elector,
                    shutdown,
                    &metrics,
                    |_| {},
                    |stop: CancellationToken| async move { stop.cancelled().await },
                )
                .await
            })
        };
        until("leading", || metrics.is_leader()).await;
        fake.fail("get", "leases", 503, "ServiceUnavailable", 1000);
        until("stepping down", || !metrics.is_leader()).await;
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), run)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    #[test]
    fn decisions() {
        let d = Duration::from_secs(15);
        let check = |holder: Option<&str>, unchanged: u64, want: Decision| {
            assert_eq!(
                decide(holder, "me", Duration::from_secs(unchanged), d),
                want,
                "{holder:?} {unchanged}"
            );
        };
        check(None, 0, Decision::TakeOver);
        check(Some(""), 0, Decision::TakeOver);
        check(Some("me"), 0, Decision::Renew);
        check(Some("me"), 100, Decision::Renew);
        check(Some("other"), 0, Decision::Wait);
        check(Some("other"), 14, Decision::Wait);
        check(Some("other"), 15, Decision::TakeOver);
    }
}
