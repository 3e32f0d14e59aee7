//! "Never two pods for one session", checked at every version of the cluster: a watch on the
//! session pods replays every change in resourceVersion order, so the set of pods it rebuilds
//! is the exact set that existed at each version. A pod counts from its creation until it
//! is removed, terminating or not (a terminating pod's process still runs).
//!
//! [`PodCensus`] is the pure bookkeeping (tested below with made-up events); [`PodWatch`]
//! feeds it from a kube-rs watcher in the background.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::{WatchStreamExt as _, watcher};
use tokio::task::JoinHandle;

/// Label the operator puts on every session pod (`wa_api::names::LABEL_SESSION`).
const SESSION_LABEL: &str = wa_api::names::LABEL_SESSION;

/// A moment at which more than one pod existed for one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlap {
    pub session: String,
    /// `name/uid` of every pod that existed at that moment.
    pub pods: Vec<String>,
    /// The resourceVersion of the change that made it so.
    pub resource_version: String,
}

/// Pods per session, rebuilt from watch events.
#[derive(Debug, Default)]
pub struct PodCensus {
    /// uid → (session, name).
    pods: BTreeMap<String, (String, String)>,
    overlaps: Vec<Overlap>,
    /// The most pods any session had at once.
    peak: usize,
    /// Sessions ever seen with a pod.
    sessions: BTreeSet<String>,
    /// Full lists (the first one, and any re-list after an error or a 410).
    lists: usize,
    changes: usize,
}

fn key(pod: &Pod) -> Option<(String, String, String)> {
    let uid = pod.metadata.uid.clone()?;
    let name = pod.metadata.name.clone()?;
    let session = pod.metadata.labels.as_ref()?.get(SESSION_LABEL)?.clone();
    Some((uid, session, name))
}

impl PodCensus {
    /// A pod was created or changed.
    pub fn applied(&mut self, pod: &Pod) {
        self.changes += 1;
        if let Some((uid, session, name)) = key(pod) {
            self.pods.insert(uid, (session.clone(), name));
            self.sessions.insert(session.clone());
            self.check(&session, pod.metadata.resource_version.as_deref().unwrap_or(""));
        }
    }

    /// A pod was removed.
    pub fn deleted(&mut self, pod: &Pod) {
        self.changes += 1;
        if let Some(uid) = &pod.metadata.uid {
            self.pods.remove(uid);
        }
    }

    /// A full list replaces what is known (a watcher's initial list or re-list). Changes
    /// between the last event and the list are not seen, which is why [`Self::lists`] is
    /// reported: a proof wants exactly one.
    pub fn relisted(&mut self, pods: &[Pod]) {
        self.lists += 1;
        self.pods.clear();
        for pod in pods {
            if let Some((uid, session, name)) = key(pod) {
                self.pods.insert(uid, (session.clone(), name));
                self.sessions.insert(session);
            }
        }
        let sessions: BTreeSet<String> = self.pods.values().map(|(s, _)| s.clone()).collect();
        for session in sessions {
            self.check(&session, "list");
        }
    }

    fn check(&mut self, session: &str, resource_version: &str) {
        let pods: Vec<String> = self
            .pods
            .iter()
            .filter(|(_, (s, _))| s == session)
            .map(|(uid, (_, name))| format!("{name}/{uid}"))
            .collect();
        self.peak = self.peak.max(pods.len());
        if pods.len() > 1 {
            self.overlaps.push(Overlap {
                session: session.to_owned(),
                pods,
                resource_version: resource_version.to_owned(),
            });
        }
    }

    pub fn overlaps(&self) -> &[Overlap] {
        &self.overlaps
    }

    pub fn peak(&self) -> usize {
        self.peak
    }

    pub fn lists(&self) -> usize {
        self.lists
    }

    pub fn changes(&self) -> usize {
        self.changes
    }

    pub fn sessions_seen(&self) -> usize {
        self.sessions.len()
    }

    /// Pods that exist now, per session.
    pub fn current(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for (session, _) in self.pods.values() {
            *counts.entry(session.clone()).or_insert(0) += 1;
        }
        counts
    }
}

/// A [`PodCensus`] kept by a background watch on the session pods of one namespace.
pub struct PodWatch {
    census: Arc<Mutex<PodCensus>>,
    task: JoinHandle<()>,
}

impl PodWatch {
    /// Starts watching; returns once the initial list is in, so nothing after this call is
    /// missed.
    pub async fn start(client: kube::Client, namespace: &str) -> anyhow::Result<Self> {
        let census = Arc::new(Mutex::new(PodCensus::default()));
        let api: Api<Pod> = Api::namespaced(client, namespace);
        let config = watcher::Config::default().labels(SESSION_LABEL);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = {
            let census = census.clone();
            tokio::spawn(async move {
                let mut ready = Some(ready_tx);
                let mut listing: Vec<Pod> = Vec::new();
                // With a backoff: once the API is gone its errors come at once, and a watcher
                // without one would spin without yielding, holding up the runtime's shutdown.
                let mut stream = std::pin::pin!(watcher(api, config).default_backoff());
                while let Some(event) = stream.next().await {
                    let mut c = census.lock().unwrap_or_else(|p| p.into_inner());
                    match event {
                        Ok(watcher::Event::Init) => listing.clear(),
                        Ok(watcher::Event::InitApply(pod)) => listing.push(pod),
                        Ok(watcher::Event::InitDone) => {
                            c.relisted(&listing);
                            listing.clear();
                            if let Some(tx) = ready.take() {
                                let _ = tx.send(());
                            }
                        }
                        Ok(watcher::Event::Apply(pod)) => c.applied(&pod),
                        Ok(watcher::Event::Delete(pod)) => c.deleted(&pod),
                        Err(e) => tracing::warn!(error = %e, "pod census watch error (the watcher re-lists)"),
                    }
                }
            })
        };
        tokio::time::timeout(std::time::Duration::from_secs(20), ready_rx)
            .await
            .map_err(|_| anyhow::anyhow!("the pod census watch did not list pods within 20s"))?
            .map_err(|_| anyhow::anyhow!("the pod census watch ended before listing pods"))?;
        Ok(Self { census, task })
    }

    /// Reads the census.
    pub fn with<T>(&self, read: impl FnOnce(&PodCensus) -> T) -> T {
        read(&self.census.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// `Ok` when no session ever had two pods at once and the watch never had to re-list
    /// (a re-list could hide a moment); otherwise what was seen.
    pub fn verdict(&self) -> anyhow::Result<()> {
        self.with(|c| {
            if !c.overlaps().is_empty() {
                anyhow::bail!("two pods existed at once for one session: {:?}", c.overlaps());
            }
            if c.lists() != 1 {
                anyhow::bail!("the pod watch re-listed ({} lists), so moments may have been missed", c.lists());
            }
            Ok(())
        })
    }
}

impl Drop for PodWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, uid: &str, session: &str, rv: u32) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": name, "uid": uid, "resourceVersion": rv.to_string(),
            "labels": {SESSION_LABEL: session}}}))
        .unwrap()
    }

    #[test]
    fn a_roll_that_deletes_before_it_creates_never_overlaps() {
        let mut c = PodCensus::default();
        c.relisted(&[]);
        c.applied(&pod("wa-a", "1", "a", 1));
        c.applied(&pod("wa-b", "2", "b", 2));
        c.applied(&pod("wa-a", "1", "a", 3)); // terminating: still counts
        c.deleted(&pod("wa-a", "1", "a", 4));
        c.applied(&pod("wa-a", "3", "a", 5));
        assert!(c.overlaps().is_empty());
        assert_eq!(c.peak(), 1);
        assert_eq!(c.current(), BTreeMap::from([("a".to_owned(), 1), ("b".to_owned(), 1)]));
        assert_eq!((c.lists(), c.changes(), c.sessions_seen()), (1, 5, 2));
    }

    #[test]
    fn a_second_pod_for_a_session_is_caught_even_with_another_name() {
        let mut c = PodCensus::default();
        c.relisted(&[pod("wa-a", "1", "a", 1)]);
        c.applied(&pod("wa-a-x7k2p", "2", "a", 2));
        assert_eq!(c.peak(), 2);
        assert_eq!(
            c.overlaps(),
            [Overlap { session: "a".into(), pods: vec!["wa-a/1".into(), "wa-a-x7k2p/2".into()], resource_version: "2".into() }]
        );
        // Already in a list.
        let mut c = PodCensus::default();
        c.relisted(&[pod("wa-a", "1", "a", 1), pod("wa-a2", "2", "a", 1)]);
        assert_eq!(c.overlaps().len(), 1);
    }

    #[test]
    fn pods_without_the_session_label_are_not_counted() {
        let mut c = PodCensus::default();
        let unlabelled: Pod = serde_json::from_value(json!({"metadata": {"name": "x", "uid": "9"}})).unwrap();
        c.applied(&unlabelled);
        c.applied(&unlabelled);
        assert!(c.current().is_empty());
        assert_eq!(c.peak(), 0);
    }
}
