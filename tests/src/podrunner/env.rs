//! A container's environment and command line, computed the way the kubelet does: `envFrom`
//! then `env`, the downward API (`fieldRef`, `resourceFieldRef`), Secret and ConfigMap keys,
//! and `$(VAR)` expansion (`$$` escapes, unknown references stay as written).
//!
//! Then the one thing a kubelet never does: paths under a volume's `mountPath` are rewritten
//! to the host directory that backs the volume, because the process runs on the host. Only
//! whole values, and values after the first `=` (`--data-dir=/data`), are rewritten; a path
//! embedded elsewhere in a string is not (see tests/README.md).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// Data the environment can refer to besides the pod itself.
#[derive(Debug, Default, Clone)]
pub struct EnvSources {
    pub pod_ip: String,
    pub host_ip: String,
    pub node_name: String,
    /// Secret name → key → decoded value.
    pub secrets: HashMap<String, BTreeMap<String, String>>,
    /// ConfigMap name → key → value.
    pub config_maps: HashMap<String, BTreeMap<String, String>>,
}

/// Why a container cannot be configured (the kubelet's `CreateContainerConfigError`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    #[error("secret \"{0}\" not found")]
    SecretNotFound(String),
    #[error("configmap \"{0}\" not found")]
    ConfigMapNotFound(String),
    #[error("couldn't find key {key} in {kind} {namespace}/{name}")]
    KeyNotFound {
        kind: &'static str,
        namespace: String,
        name: String,
        key: String,
    },
    #[error("unsupported fieldPath: {0}")]
    UnsupportedField(String),
    #[error("unsupported resource: {0}")]
    UnsupportedResource(String),
}

/// Expands `$(VAR)` references; `$$` is a literal `$`, unknown or unterminated references are
/// kept as written.
pub fn expand(input: &str, lookup: &dyn Fn(&str) -> Option<String>) -> String {
    let bytes = input.as_bytes();
    let mut out = String::with_capacity(input.len());
    let mut i = 0;
    let mut copied = 0;
    while i < bytes.len() {
        if bytes[i] == b'$' && i + 1 < bytes.len() {
            out.push_str(&input[copied..i]);
            match bytes[i + 1] {
                b'$' => {
                    out.push('$');
                    i += 2;
                }
                b'(' => match input[i + 2..].find(')') {
                    Some(close) => {
                        let name = &input[i + 2..i + 2 + close];
                        match lookup(name) {
                            Some(value) => out.push_str(&value),
                            None => out.push_str(&format!("$({name})")),
                        }
                        i += close + 3;
                    }
                    None => {
                        out.push_str("$(");
                        i += 2;
                    }
                },
                _ => {
                    out.push('$');
                    i += 1;
                }
            }
            copied = i;
        } else {
            i += 1;
        }
    }
    out.push_str(&input[copied..]);
    out
}

fn field_ref(pod: &Pod, path: &str, src: &EnvSources) -> Result<String, EnvError> {
    let meta = &pod.metadata;
    let keyed = |prefix: &str, map: Option<&BTreeMap<String, String>>| -> Option<Option<String>> {
        let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
        Some(map.and_then(|m| m.get(key)).cloned())
    };
    if let Some(v) = keyed("metadata.labels['", meta.labels.as_ref()) {
        return Ok(v.unwrap_or_default());
    }
    if let Some(v) = keyed("metadata.annotations['", meta.annotations.as_ref()) {
        return Ok(v.unwrap_or_default());
    }
    let spec = pod.spec.as_ref();
    Ok(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_else(|| src.node_name.clone()),
        "spec.serviceAccountName" => spec.and_then(|s| s.service_account_name.clone()).unwrap_or_default(),
        "status.podIP" | "status.podIPs" => src.pod_ip.clone(),
        "status.hostIP" | "status.hostIPs" => src.host_ip.clone(),
        other => return Err(EnvError::UnsupportedField(other.to_owned())),
    })
}

/// A quantity as a number of base units (`256Mi` → 268435456, `10m` → 0.01).
pub fn quantity(q: &str) -> Option<f64> {
    let q = q.trim();
    let split = q.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == '+')).unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    let number: f64 = number.parse().ok()?;
    let factor = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024f64.powi(4),
        s if s.starts_with(['e', 'E']) => 10f64.powi(s[1..].parse().ok()?),
        _ => return None,
    };
    Some(number * factor)
}

fn resource_ref(container: &Container, resource: &str, divisor: Option<&Quantity>) -> Result<String, EnvError> {
    let (section, name) = resource
        .split_once('.')
        .ok_or_else(|| EnvError::UnsupportedResource(resource.to_owned()))?;
    let resources = container.resources.as_ref();
    let map = match section {
        "limits" => resources.and_then(|r| r.limits.as_ref()),
        "requests" => resources.and_then(|r| r.requests.as_ref()),
        _ => return Err(EnvError::UnsupportedResource(resource.to_owned())),
    };
    // Unset limits are the node's capacity; this node reports 1 CPU and 4Gi.
    let value = match map.and_then(|m| m.get(name)) {
        Some(q) => quantity(&q.0).ok_or_else(|| EnvError::UnsupportedResource(resource.to_owned()))?,
        None => match name {
            "cpu" => 1.0,
            "memory" | "ephemeral-storage" => 4.0 * 1024f64.powi(3),
            _ => 0.0,
        },
    };
    let divisor = divisor.and_then(|d| quantity(&d.0)).filter(|d| *d > 0.0).unwrap_or(1.0);
    Ok(format!("{}", (value / divisor).ceil() as i64))
}

fn valid_env_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
}

/// The container's environment, in order, fully expanded.
pub fn container_env(pod: &Pod, container: &Container, src: &EnvSources) -> Result<Vec<(String, String)>, EnvError> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let mut vars: Vec<(String, String)> = Vec::new();
    let set = |vars: &mut Vec<(String, String)>, name: String, value: String| {
        vars.retain(|(n, _)| *n != name);
        vars.push((name, value));
    };
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        if let Some(r) = &from.secret_ref {
            match src.secrets.get(&r.name) {
                Some(data) => data.iter().for_each(|(k, v)| {
                    if valid_env_name(&format!("{prefix}{k}")) {
                        set(&mut vars, format!("{prefix}{k}"), v.clone());
                    }
                }),
                None if r.optional == Some(true) => {}
                None => return Err(EnvError::SecretNotFound(r.name.clone())),
            }
        }
        if let Some(r) = &from.config_map_ref {
            match src.config_maps.get(&r.name) {
                Some(data) => data.iter().for_each(|(k, v)| {
                    if valid_env_name(&format!("{prefix}{k}")) {
                        set(&mut vars, format!("{prefix}{k}"), v.clone());
                    }
                }),
                None if r.optional == Some(true) => {}
                None => return Err(EnvError::ConfigMapNotFound(r.name.clone())),
            }
        }
    }
    for var in container.env.iter().flatten() {
        let value = if let Some(from) = &var.value_from {
            if let Some(f) = &from.field_ref {
                Some(field_ref(pod, &f.field_path, src)?)
            } else if let Some(r) = &from.resource_field_ref {
                Some(resource_ref(container, &r.resource, r.divisor.as_ref())?)
            } else if let Some(s) = &from.secret_key_ref {
                let optional = s.optional == Some(true);
                match src.secrets.get(&s.name) {
                    Some(data) => match data.get(&s.key) {
                        Some(v) => Some(v.clone()),
                        None if optional => None,
                        None => {
                            return Err(EnvError::KeyNotFound {
                                kind: "Secret",
                                namespace: namespace.clone(),
                                name: s.name.clone(),
                                key: s.key.clone(),
                            });
                        }
                    },
                    None if optional => None,
                    None => return Err(EnvError::SecretNotFound(s.name.clone())),
                }
            } else if let Some(c) = &from.config_map_key_ref {
                let optional = c.optional == Some(true);
                match src.config_maps.get(&c.name) {
                    Some(data) => match data.get(&c.key) {
                        Some(v) => Some(v.clone()),
                        None if optional => None,
                        None => {
                            return Err(EnvError::KeyNotFound {
                                kind: "ConfigMap",
                                namespace: namespace.clone(),
                                name: c.name.clone(),
                                key: c.key.clone(),
                            });
                        }
                    },
                    None if optional => None,
                    None => return Err(EnvError::ConfigMapNotFound(c.name.clone())),
                }
            } else {
                None
            }
        } else {
            // Only variables defined before this one can be referenced.
            let defined: HashMap<String, String> = vars.iter().cloned().collect();
            Some(expand(var.value.as_deref().unwrap_or(""), &|name| defined.get(name).cloned()))
        };
        if let Some(value) = value {
            set(&mut vars, var.name.clone(), value);
        }
    }
    Ok(vars)
}

/// Command and arguments with `$(VAR)` expanded from the container's environment.
pub fn command_line(container: &Container, env: &[(String, String)]) -> (Vec<String>, Vec<String>) {
    let map: HashMap<&str, &str> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let lookup = |name: &str| map.get(name).map(|v| v.to_string());
    let expand_all = |list: &Option<Vec<String>>| -> Vec<String> {
        list.iter().flatten().map(|s| expand(s, &lookup)).collect()
    };
    (expand_all(&container.command), expand_all(&container.args))
}

/// Mount path → host directory, longest mount path first.
#[derive(Debug, Clone, Default)]
pub struct MountMap(Vec<(String, PathBuf)>);

impl MountMap {
    pub fn new(mut mounts: Vec<(String, PathBuf)>) -> Self {
        for (path, _) in mounts.iter_mut() {
            while path.len() > 1 && path.ends_with('/') {
                path.pop();
            }
        }
        mounts.sort_by_key(|m| std::cmp::Reverse(m.0.len()));
        Self(mounts)
    }

    pub fn host_dir(&self, mount_path: &str) -> Option<&PathBuf> {
        self.0.iter().find(|(m, _)| m == mount_path).map(|(_, h)| h)
    }

    fn rewrite_path(&self, value: &str) -> Option<String> {
        // A path that already exists on this machine is one the harness put into the spec (a
        // test fixture, a binary: what an image would hold), not a place in a volume; a clone
        // below /tmp must not have its own files mapped into a pod's /tmp.
        if self.0.iter().all(|(mount, _)| value != mount) && Path::new(value).exists() {
            return None;
        }
        for (mount, host) in &self.0 {
            if value == mount {
                return Some(host.display().to_string());
            }
            if let Some(rest) = value.strip_prefix(mount.as_str())
                && rest.starts_with('/') {
                    return Some(format!("{}{rest}", host.display()));
                }
        }
        None
    }

    /// `/data/x` → `<host>/x`; `--dir=/data` → `--dir=<host>`; anything else unchanged.
    pub fn rewrite(&self, value: &str) -> String {
        if let Some(v) = self.rewrite_path(value) {
            return v;
        }
        if let Some((flag, rest)) = value.split_once('=')
            && let Some(v) = self.rewrite_path(rest) {
                return format!("{flag}={v}");
            }
        value.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(env: serde_json::Value) -> (Pod, Container) {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "wa-a", "namespace": "ns", "uid": "u-1", "labels": {"app": "wa"}},
            "spec": {"nodeName": "node", "containers": [{"name": "session", "image": "wa-session:1",
                "resources": {"limits": {"memory": "256Mi"}, "requests": {"cpu": "10m"}},
                "env": env, "command": ["wa-session"], "args": ["--listen=$(WA_LISTEN)", "$$(NOT)", "$(MISSING)"]}]}
        }))
        .unwrap();
        let container = pod.spec.as_ref().unwrap().containers[0].clone();
        (pod, container)
    }

    fn sources() -> EnvSources {
        EnvSources {
            pod_ip: "127.0.0.7".into(),
            host_ip: "127.0.0.1".into(),
            node_name: "node".into(),
            secrets: HashMap::from([("wa-a-token".into(), BTreeMap::from([("token".into(), "t0k".into())]))]),
            config_maps: HashMap::from([("cfg".into(), BTreeMap::from([("LEVEL".into(), "debug".into())]))]),
        }
    }

    #[test]
    fn expansion_follows_the_kubelet() {
        let vars = HashMap::from([("A", "1"), ("B", "two")]);
        let lookup = |n: &str| vars.get(n).map(|v| v.to_string());
        let cases = [
            ("$(A)", "1"),
            ("x$(A)y$(B)z", "x1ytwoz"),
            ("$$(A)", "$(A)"),
            ("$$", "$"),
            ("$(UNKNOWN)", "$(UNKNOWN)"),
            ("$(A", "$(A"),
            ("$A", "$A"),
            ("cost: 5$", "cost: 5$"),
            ("", ""),
            ("$(A)$(A)", "11"),
        ];
        for (input, expected) in cases {
            assert_eq!(expand(input, &lookup), expected, "{input:?}");
        }
    }

    #[test]
    fn env_of_a_session_pod() {
        let (pod, c) = pod(json!([
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "WA_LISTEN", "value": "$(POD_IP):8080"},
            {"name": "EARLY", "value": "$(LATE)"},
            {"name": "LATE", "value": "x"},
            {"name": "WA_TOKEN", "valueFrom": {"secretKeyRef": {"name": "wa-a-token", "key": "token"}}},
            {"name": "LOG", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "LEVEL"}}},
            {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            {"name": "MEM", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}},
            {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "requests.cpu", "divisor": "1m"}}},
            {"name": "OPT", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k", "optional": true}}},
        ]));
        let env = container_env(&pod, &c, &sources()).unwrap();
        let map: HashMap<_, _> = env.iter().cloned().collect();
        assert_eq!(map["WA_LISTEN"], "127.0.0.7:8080");
        assert_eq!(map["EARLY"], "$(LATE)", "later variables are not visible");
        assert_eq!(map["WA_TOKEN"], "t0k");
        assert_eq!(map["LOG"], "debug");
        assert_eq!((map["NAME"].as_str(), map["NS"].as_str(), map["APP"].as_str()), ("wa-a", "ns", "wa"));
        assert_eq!((map["MEM"].as_str(), map["CPU"].as_str()), ("256", "10"));
        assert!(!map.contains_key("OPT"));
        let (command, args) = command_line(&c, &env);
        assert_eq!(command, ["wa-session"]);
        assert_eq!(args, ["--listen=127.0.0.7:8080", "$(NOT)", "$(MISSING)"]);
    }

    #[test]
    fn missing_references_are_config_errors() {
        let cases = [
            (json!([{"name": "T", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "token"}}}]), "secret \"nope\" not found"),
            (json!([{"name": "T", "valueFrom": {"secretKeyRef": {"name": "wa-a-token", "key": "nope"}}}]), "couldn't find key nope in Secret ns/wa-a-token"),
            (json!([{"name": "T", "valueFrom": {"configMapKeyRef": {"name": "nope", "key": "k"}}}]), "configmap \"nope\" not found"),
            (json!([{"name": "T", "valueFrom": {"fieldRef": {"fieldPath": "spec.bogus"}}}]), "unsupported fieldPath: spec.bogus"),
        ];
        for (env, message) in cases {
            let (pod, c) = pod(env);
            assert_eq!(container_env(&pod, &c, &sources()).unwrap_err().to_string(), message);
        }
    }

    #[test]
    fn env_from_with_prefix_then_env_overrides() {
        let (pod, mut c) = pod(json!([{"name": "CFG_LEVEL", "value": "info"}]));
        c.env_from = Some(serde_json::from_value(json!([{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}, {"secretRef": {"name": "wa-a-token"}}])).unwrap());
        let env = container_env(&pod, &c, &sources()).unwrap();
        assert_eq!(env, vec![("token".into(), "t0k".into()), ("CFG_LEVEL".into(), "info".into())]);
    }

    #[test]
    fn mount_paths_are_rewritten() {
        let mounts = MountMap::new(vec![("/data".into(), "/host/pvc-1".into()), ("/data/cache/".into(), "/host/cache".into())]);
        let cases = [
            ("/data", "/host/pvc-1"),
            ("/data/auth.db", "/host/pvc-1/auth.db"),
            ("/data/cache/x", "/host/cache/x"),
            ("--data-dir=/data", "--data-dir=/host/pvc-1"),
            ("/database", "/database"),
            ("x/data", "x/data"),
            ("127.0.0.7:8080", "127.0.0.7:8080"),
        ];
        for (input, expected) in cases {
            assert_eq!(mounts.rewrite(input), expected, "{input}");
        }
        // Files that exist on this machine stay where they are, even below a mount path.
        let crate_dir = env!("CARGO_MANIFEST_DIR");
        let parent = Path::new(crate_dir).parent().unwrap().display().to_string();
        let mounts = MountMap::new(vec![(parent.clone(), "/host/pvc-2".into())]);
        let manifest = format!("{crate_dir}/Cargo.toml");
        let missing = format!("{parent}/no-such-file");
        let cases = [
            (manifest.as_str(), manifest.as_str()),
            (parent.as_str(), "/host/pvc-2"),
            (missing.as_str(), "/host/pvc-2/no-such-file"),
        ];
        for (input, expected) in cases {
            assert_eq!(mounts.rewrite(input), expected, "{input}");
        }
    }

    #[test]
    fn quantities() {
        assert_eq!(quantity("256Mi"), Some(268435456.0));
        assert_eq!(quantity("10m"), Some(0.01));
        assert_eq!(quantity("1e3"), Some(1000.0));
        assert_eq!(quantity("x"), None);
    }
}
