//! Objects in memory, one global monotonic resourceVersion, and a bounded history of changes
//! that watches resume from (a version older than the history answers 410 Gone).
//!
//! Every write bumps the version by one and records exactly one event, like etcd's revision;
//! the object's `metadata.resourceVersion` is the revision of its last write.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use serde_json::Value;
use tokio::sync::watch;

use super::catalog::StorageKey;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change, as watches replay it.
#[derive(Debug)]
pub struct StoredEvent {
    pub rv: u64,
    pub storage: StorageKey,
    pub namespace: String,
    pub kind: EventType,
    /// The object after the change (for a deletion: its last state, at the deletion's version).
    pub object: Arc<Value>,
    /// The object before the change, so watches with selectors see objects enter and leave.
    pub previous: Option<Arc<Value>>,
}

/// Asked for changes the history no longer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compacted {
    /// The oldest version a watch can still resume from.
    pub oldest: u64,
}

type Objects = BTreeMap<(String, String), Arc<Value>>;

pub struct Store {
    rv: u64,
    objects: HashMap<StorageKey, Objects>,
    uids: HashMap<String, (StorageKey, String, String)>,
    history: VecDeque<Arc<StoredEvent>>,
    capacity: usize,
    /// Every event with a version up to this one has been dropped from the history.
    compacted: u64,
    notify: watch::Sender<u64>,
}

fn set_rv(obj: &mut Value, rv: u64) {
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
    }
}

fn uid_of(obj: &Value) -> Option<String> {
    obj["metadata"]["uid"].as_str().map(str::to_owned)
}

impl Store {
    pub fn new(capacity: usize) -> Self {
        let (notify, _) = watch::channel(0);
        Self {
            rv: 0,
            objects: HashMap::new(),
            uids: HashMap::new(),
            history: VecDeque::new(),
            capacity: capacity.max(1),
            compacted: 0,
            notify,
        }
    }

    pub fn current_rv(&self) -> u64 {
        self.rv
    }

    /// Wakes up when the version moves; watches and controllers wait on it.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.notify.subscribe()
    }

    pub fn get(&self, storage: &str, namespace: &str, name: &str) -> Option<&Arc<Value>> {
        self.objects
            .get(storage)?
            .get(&(namespace.to_owned(), name.to_owned()))
    }

    /// Objects of one storage, in one namespace or all, ordered by namespace and name.
    pub fn list<'s>(&'s self, storage: &str, namespace: Option<&'s str>) -> Box<dyn Iterator<Item = &'s Arc<Value>> + 's> {
        let Some(objects) = self.objects.get(storage) else {
            return Box::new(std::iter::empty());
        };
        match namespace {
            Some(ns) => Box::new(
                objects
                    .range((ns.to_owned(), String::new())..)
                    .take_while(move |((n, _), _)| n == ns)
                    .map(|(_, v)| v),
            ),
            None => Box::new(objects.values()),
        }
    }

    pub fn storages(&self) -> impl Iterator<Item = &StorageKey> {
        self.objects.keys()
    }

    pub fn count(&self, storage: &str) -> usize {
        self.objects.get(storage).map(BTreeMap::len).unwrap_or(0)
    }

    /// Where the object with this uid lives.
    pub fn find_uid(&self, uid: &str) -> Option<&(StorageKey, String, String)> {
        self.uids.get(uid)
    }

    fn record(&mut self, event: StoredEvent) {
        self.history.push_back(Arc::new(event));
        while self.history.len() > self.capacity {
            if let Some(dropped) = self.history.pop_front() {
                self.compacted = dropped.rv;
            }
        }
        self.notify.send_replace(self.rv);
    }

    /// Stores a new object; the caller checked that the name is free.
    pub fn insert(&mut self, storage: &StorageKey, namespace: &str, name: &str, mut obj: Value) -> Arc<Value> {
        self.rv += 1;
        set_rv(&mut obj, self.rv);
        let obj = Arc::new(obj);
        if let Some(uid) = uid_of(&obj) {
            self.uids
                .insert(uid, (storage.clone(), namespace.to_owned(), name.to_owned()));
        }
        self.objects
            .entry(storage.clone())
            .or_default()
            .insert((namespace.to_owned(), name.to_owned()), obj.clone());
        self.record(StoredEvent {
            rv: self.rv,
            storage: storage.clone(),
            namespace: namespace.to_owned(),
            kind: EventType::Added,
            object: obj.clone(),
            previous: None,
        });
        obj
    }

    /// Replaces an existing object.
    pub fn replace(&mut self, storage: &StorageKey, namespace: &str, name: &str, mut obj: Value) -> Arc<Value> {
        self.rv += 1;
        set_rv(&mut obj, self.rv);
        let obj = Arc::new(obj);
        let previous = self
            .objects
            .entry(storage.clone())
            .or_default()
            .insert((namespace.to_owned(), name.to_owned()), obj.clone());
        self.record(StoredEvent {
            rv: self.rv,
            storage: storage.clone(),
            namespace: namespace.to_owned(),
            kind: EventType::Modified,
            object: obj.clone(),
            previous,
        });
        obj
    }

    /// Removes an object; its last state carries the deletion's version.
    pub fn remove(&mut self, storage: &StorageKey, namespace: &str, name: &str) -> Option<Arc<Value>> {
        let previous = self
            .objects
            .get_mut(storage)?
            .remove(&(namespace.to_owned(), name.to_owned()))?;
        if let Some(uid) = uid_of(&previous) {
            self.uids.remove(&uid);
        }
        self.rv += 1;
        let mut last = (*previous).clone();
        set_rv(&mut last, self.rv);
        let last = Arc::new(last);
        self.record(StoredEvent {
            rv: self.rv,
            storage: storage.clone(),
            namespace: namespace.to_owned(),
            kind: EventType::Deleted,
            object: last.clone(),
            previous: Some(previous),
        });
        Some(last)
    }

    /// Events after `rv`, oldest first; `Err` when some of them were already dropped.
    pub fn events_after(&self, rv: u64) -> Result<Vec<Arc<StoredEvent>>, Compacted> {
        if rv < self.compacted {
            return Err(Compacted { oldest: self.compacted });
        }
        let start = self.history.partition_point(|e| e.rv <= rv);
        Ok(self.history.range(start..).cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str) -> Value {
        json!({"metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}")}})
    }

    #[test]
    fn versions_are_global_and_monotonic() {
        let mut store = Store::new(100);
        let pods: StorageKey = "/pods".into();
        let secrets: StorageKey = "/secrets".into();
        let a = store.insert(&pods, "ns", "a", pod("a"));
        let s = store.insert(&secrets, "ns", "s", pod("s"));
        let a2 = store.replace(&pods, "ns", "a", pod("a"));
        let gone = store.remove(&pods, "ns", "a").unwrap();
        let rvs: Vec<&str> = [&a, &s, &a2, &gone]
            .iter()
            .map(|o| o["metadata"]["resourceVersion"].as_str().unwrap())
            .collect();
        assert_eq!(rvs, ["1", "2", "3", "4"]);
        assert!(store.get("/pods", "ns", "a").is_none());
        assert!(store.find_uid("uid-a").is_none());
        assert!(store.find_uid("uid-s").is_some());
        let kinds: Vec<EventType> = store.events_after(1).unwrap().iter().map(|e| e.kind).collect();
        assert_eq!(kinds, [EventType::Added, EventType::Modified, EventType::Deleted]);
    }

    #[test]
    fn history_is_bounded_and_old_versions_are_gone() {
        let mut store = Store::new(3);
        let pods: StorageKey = "/pods".into();
        for i in 0..5 {
            store.insert(&pods, "ns", &format!("p{i}"), pod(&format!("p{i}")));
        }
        // Events 1 and 2 were dropped: resuming from 1 would miss event 2.
        assert_eq!(store.events_after(1).unwrap_err(), Compacted { oldest: 2 });
        assert_eq!(store.events_after(2).unwrap().len(), 3);
        assert_eq!(store.events_after(5).unwrap().len(), 0);
    }

    #[test]
    fn lists_by_namespace() {
        let mut store = Store::new(10);
        let pods: StorageKey = "/pods".into();
        for (ns, name) in [("a", "x"), ("b", "y"), ("a", "z"), ("ab", "w")] {
            store.insert(&pods, ns, name, json!({"metadata": {"name": name, "namespace": ns}}));
        }
        let names = |ns| -> Vec<String> {
            store
                .list("/pods", ns)
                .map(|o| o["metadata"]["name"].as_str().unwrap().to_owned())
                .collect()
        };
        assert_eq!(names(Some("a")), ["x", "z"]);
        assert_eq!(names(None), ["x", "z", "w", "y"]);
        assert!(store.list("/secrets", None).next().is_none());
    }
}
