//! Which resources the emulator serves: the built-in kinds wa-operator and its users touch, and
//! every version of every registered CustomResourceDefinition.
//!
//! A [`ResourceType`] is one (group, version, resource) as discovery lists it. Objects live in
//! storage keyed by group and resource only, so every version of a CRD (conversion strategy
//! `None`) and both Event APIs (`v1` and `events.k8s.io/v1`) share one set of objects, as they
//! do in a real cluster.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::Value;

use super::status::Subject;

/// Key of one storage: `"/pods"`, `"wa-operator.dev/whatsappsessions"`.
pub type StorageKey = Arc<str>;

/// The built-in kinds, each with its own admission rules, table columns and list semantics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BuiltinKind {
    Namespace,
    Node,
    Pod,
    Secret,
    ConfigMap,
    PersistentVolumeClaim,
    Service,
    ServiceAccount,
    /// `v1` Events; also the storage of `events.k8s.io/v1` Events.
    Event,
    /// `events.k8s.io/v1` Events, converted to and from the `v1` storage.
    EventV1,
    Lease,
    CustomResourceDefinition,
    Role,
    RoleBinding,
    ClusterRole,
    ClusterRoleBinding,
    /// `apps/v1`: run by the workload controllers (`workloads.rs`).
    Deployment,
    ReplicaSet,
    /// Stored only: nothing enforces them here.
    NetworkPolicy,
    PodDisruptionBudget,
}

/// How a served resource behaves beyond plain storage.
#[derive(Debug, Clone)]
pub enum Behaviour {
    Builtin(BuiltinKind),
    Custom(Arc<CustomVersion>),
}

/// One served version of a CRD: its schema and printer columns.
#[derive(Debug, Clone)]
pub struct CustomVersion {
    /// Name of the CustomResourceDefinition object (`whatsappsessions.wa-operator.dev`).
    pub crd_name: String,
    /// `openAPIV3Schema`; `None` when the CRD gives none (everything is kept).
    pub schema: Option<Value>,
    pub columns: Vec<PrinterColumn>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PrinterColumn {
    pub name: String,
    pub type_: String,
    pub format: String,
    pub description: String,
    pub priority: i64,
    pub json_path: String,
}

/// One resource as discovery shows it.
#[derive(Debug, Clone)]
pub struct ResourceType {
    pub group: String,
    pub version: String,
    pub resource: String,
    pub singular: String,
    pub kind: String,
    pub list_kind: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    /// Whether `status` is a subresource (the main endpoint then ignores status changes).
    pub status_subresource: bool,
    pub storage: StorageKey,
    pub behaviour: Behaviour,
}

impl ResourceType {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn subject(&self) -> Subject<'_> {
        Subject {
            group: &self.group,
            resource: &self.resource,
            kind: &self.kind,
        }
    }

    pub fn builtin(&self) -> Option<BuiltinKind> {
        match &self.behaviour {
            Behaviour::Builtin(kind) => Some(*kind),
            Behaviour::Custom(_) => None,
        }
    }

    pub fn custom(&self) -> Option<&Arc<CustomVersion>> {
        match &self.behaviour {
            Behaviour::Custom(custom) => Some(custom),
            Behaviour::Builtin(_) => None,
        }
    }

    /// Subresources served besides the main resource, as discovery names them.
    pub fn subresources(&self) -> Vec<(&'static str, &'static [&'static str])> {
        let mut subs = Vec::new();
        if self.status_subresource {
            subs.push(("status", &["get", "patch", "update"][..]));
        }
        match self.builtin() {
            Some(BuiltinKind::Pod) => {
                subs.push(("binding", &["create"][..]));
                subs.push(("log", &["get"][..]));
            }
            Some(BuiltinKind::Namespace) => subs.push(("finalize", &["update"][..])),
            Some(BuiltinKind::Deployment | BuiltinKind::ReplicaSet) => subs.push(("scale", &["get", "patch", "update"][..])),
            _ => {}
        }
        subs
    }
}

/// Built-in resources: (group, version, resource, singular, kind, namespaced, short names,
/// status subresource, storage, behaviour).
struct Builtin {
    group: &'static str,
    version: &'static str,
    resource: &'static str,
    kind: &'static str,
    namespaced: bool,
    short_names: &'static [&'static str],
    status: bool,
    storage: &'static str,
    behaviour: BuiltinKind,
}

const BUILTINS: &[Builtin] = &[
    Builtin { group: "", version: "v1", resource: "namespaces", kind: "Namespace", namespaced: false, short_names: &["ns"], status: true, storage: "/namespaces", behaviour: BuiltinKind::Namespace },
    Builtin { group: "", version: "v1", resource: "nodes", kind: "Node", namespaced: false, short_names: &["no"], status: true, storage: "/nodes", behaviour: BuiltinKind::Node },
    Builtin { group: "", version: "v1", resource: "pods", kind: "Pod", namespaced: true, short_names: &["po"], status: true, storage: "/pods", behaviour: BuiltinKind::Pod },
    Builtin { group: "", version: "v1", resource: "secrets", kind: "Secret", namespaced: true, short_names: &[], status: false, storage: "/secrets", behaviour: BuiltinKind::Secret },
    Builtin { group: "", version: "v1", resource: "configmaps", kind: "ConfigMap", namespaced: true, short_names: &["cm"], status: false, storage: "/configmaps", behaviour: BuiltinKind::ConfigMap },
    Builtin { group: "", version: "v1", resource: "persistentvolumeclaims", kind: "PersistentVolumeClaim", namespaced: true, short_names: &["pvc"], status: true, storage: "/persistentvolumeclaims", behaviour: BuiltinKind::PersistentVolumeClaim },
    Builtin { group: "", version: "v1", resource: "services", kind: "Service", namespaced: true, short_names: &["svc"], status: true, storage: "/services", behaviour: BuiltinKind::Service },
    Builtin { group: "", version: "v1", resource: "serviceaccounts", kind: "ServiceAccount", namespaced: true, short_names: &["sa"], status: false, storage: "/serviceaccounts", behaviour: BuiltinKind::ServiceAccount },
    Builtin { group: "", version: "v1", resource: "events", kind: "Event", namespaced: true, short_names: &["ev"], status: false, storage: "/events", behaviour: BuiltinKind::Event },
    Builtin { group: "events.k8s.io", version: "v1", resource: "events", kind: "Event", namespaced: true, short_names: &["ev"], status: false, storage: "/events", behaviour: BuiltinKind::EventV1 },
    Builtin { group: "coordination.k8s.io", version: "v1", resource: "leases", kind: "Lease", namespaced: true, short_names: &[], status: false, storage: "coordination.k8s.io/leases", behaviour: BuiltinKind::Lease },
    Builtin { group: "apiextensions.k8s.io", version: "v1", resource: "customresourcedefinitions", kind: "CustomResourceDefinition", namespaced: false, short_names: &["crd", "crds"], status: true, storage: "apiextensions.k8s.io/customresourcedefinitions", behaviour: BuiltinKind::CustomResourceDefinition },
    Builtin { group: "rbac.authorization.k8s.io", version: "v1", resource: "roles", kind: "Role", namespaced: true, short_names: &[], status: false, storage: "rbac.authorization.k8s.io/roles", behaviour: BuiltinKind::Role },
    Builtin { group: "rbac.authorization.k8s.io", version: "v1", resource: "rolebindings", kind: "RoleBinding", namespaced: true, short_names: &[], status: false, storage: "rbac.authorization.k8s.io/rolebindings", behaviour: BuiltinKind::RoleBinding },
    Builtin { group: "rbac.authorization.k8s.io", version: "v1", resource: "clusterroles", kind: "ClusterRole", namespaced: false, short_names: &[], status: false, storage: "rbac.authorization.k8s.io/clusterroles", behaviour: BuiltinKind::ClusterRole },
    Builtin { group: "apps", version: "v1", resource: "deployments", kind: "Deployment", namespaced: true, short_names: &["deploy"], status: true, storage: "apps/deployments", behaviour: BuiltinKind::Deployment },
    Builtin { group: "apps", version: "v1", resource: "replicasets", kind: "ReplicaSet", namespaced: true, short_names: &["rs"], status: true, storage: "apps/replicasets", behaviour: BuiltinKind::ReplicaSet },
    Builtin { group: "networking.k8s.io", version: "v1", resource: "networkpolicies", kind: "NetworkPolicy", namespaced: true, short_names: &["netpol"], status: false, storage: "networking.k8s.io/networkpolicies", behaviour: BuiltinKind::NetworkPolicy },
    Builtin { group: "policy", version: "v1", resource: "poddisruptionbudgets", kind: "PodDisruptionBudget", namespaced: true, short_names: &["pdb"], status: true, storage: "policy/poddisruptionbudgets", behaviour: BuiltinKind::PodDisruptionBudget },
    Builtin { group: "rbac.authorization.k8s.io", version: "v1", resource: "clusterrolebindings", kind: "ClusterRoleBinding", namespaced: false, short_names: &[], status: false, storage: "rbac.authorization.k8s.io/clusterrolebindings", behaviour: BuiltinKind::ClusterRoleBinding },
];

/// Categories of built-ins (`kubectl get all` lists the `all` category).
fn builtin_categories(kind: BuiltinKind) -> Vec<String> {
    match kind {
        BuiltinKind::Pod | BuiltinKind::Service | BuiltinKind::Deployment | BuiltinKind::ReplicaSet => vec!["all".into()],
        BuiltinKind::CustomResourceDefinition => vec!["api-extensions".into()],
        _ => Vec::new(),
    }
}

/// Every served resource type. Owned by the server state, changed when CRDs come and go.
#[derive(Debug, Clone)]
pub struct Catalog {
    types: Vec<ResourceType>,
}

impl Default for Catalog {
    fn default() -> Self {
        Self::new()
    }
}

impl Catalog {
    pub fn new() -> Self {
        let types = BUILTINS
            .iter()
            .map(|b| ResourceType {
                group: b.group.into(),
                version: b.version.into(),
                resource: b.resource.into(),
                singular: b.kind.to_ascii_lowercase(),
                kind: b.kind.into(),
                list_kind: format!("{}List", b.kind),
                namespaced: b.namespaced,
                short_names: b.short_names.iter().map(|s| s.to_string()).collect(),
                categories: builtin_categories(b.behaviour),
                status_subresource: b.status,
                storage: b.storage.into(),
                behaviour: Behaviour::Builtin(b.behaviour),
            })
            .collect();
        Self { types }
    }

    pub fn find(&self, group: &str, version: &str, resource: &str) -> Option<&ResourceType> {
        self.types
            .iter()
            .find(|t| t.group == group && t.version == version && t.resource == resource)
    }

    /// The served type of a kind in a group version (for ownerReferences and apply bodies).
    pub fn find_kind(&self, api_version: &str, kind: &str) -> Option<&ResourceType> {
        let (group, version) = split_api_version(api_version);
        self.types
            .iter()
            .find(|t| t.group == group && t.version == version && t.kind == kind)
    }

    pub fn all(&self) -> &[ResourceType] {
        &self.types
    }

    /// Served versions of a group, highest priority first (`v1` before `v1beta1`).
    pub fn group_versions(&self, group: &str) -> Vec<String> {
        let mut versions: Vec<String> = Vec::new();
        for t in &self.types {
            if t.group == group && !versions.contains(&t.version) {
                versions.push(t.version.clone());
            }
        }
        versions.sort_by(|a, b| version_priority(b).cmp(&version_priority(a)).then_with(|| a.cmp(b)));
        versions
    }

    /// Named groups in discovery order: built-in groups first, then CRD groups by name.
    pub fn groups(&self) -> Vec<String> {
        let mut builtin: Vec<String> = Vec::new();
        let mut custom: Vec<String> = Vec::new();
        for t in &self.types {
            if t.group.is_empty() {
                continue;
            }
            let list = if t.custom().is_some() { &mut custom } else { &mut builtin };
            if !list.contains(&t.group) {
                list.push(t.group.clone());
            }
        }
        custom.sort();
        builtin.retain(|g| !custom.contains(g));
        builtin.extend(custom);
        builtin
    }

    pub fn in_group_version(&self, group: &str, version: &str) -> impl Iterator<Item = &ResourceType> {
        let (group, version) = (group.to_owned(), version.to_owned());
        self.types.iter().filter(move |t| t.group == group && t.version == version)
    }

    /// The storage key CRD objects of this name are kept under.
    pub fn crd_storage(group: &str, plural: &str) -> StorageKey {
        format!("{group}/{plural}").into()
    }

    /// Serves (or re-serves, after an update) every served version of a CRD.
    pub fn register_crd(&mut self, crd: &Value) -> Result<(), String> {
        let parsed = parse_crd(crd)?;
        let name = parsed.first().map(|t| match &t.behaviour {
            Behaviour::Custom(c) => c.crd_name.clone(),
            Behaviour::Builtin(_) => String::new(),
        });
        if let Some(name) = name {
            self.unregister_crd(&name);
        }
        self.types.extend(parsed);
        Ok(())
    }

    pub fn unregister_crd(&mut self, crd_name: &str) {
        self.types
            .retain(|t| !matches!(&t.behaviour, Behaviour::Custom(c) if c.crd_name == crd_name));
    }

    /// Whether a CRD's group/plural would shadow a built-in (refused like a real server does).
    pub fn is_builtin_resource(&self, group: &str, resource: &str) -> bool {
        self.types
            .iter()
            .any(|t| t.group == group && t.resource == resource && t.custom().is_none())
    }
}

pub fn split_api_version(api_version: &str) -> (&str, &str) {
    match api_version.split_once('/') {
        Some((group, version)) => (group, version),
        None => ("", api_version),
    }
}

/// Kubernetes version ordering: GA > beta > alpha, then by number (`v2` > `v1`).
pub fn version_priority(version: &str) -> (u8, u32, u32) {
    let Some(rest) = version.strip_prefix('v') else {
        return (0, 0, 0);
    };
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    let Ok(major) = digits.parse::<u32>() else {
        return (0, 0, 0);
    };
    let tail = &rest[digits.len()..];
    let (level, minor_str) = if tail.is_empty() {
        return (3, major, 0);
    } else if let Some(m) = tail.strip_prefix("beta") {
        (2, m)
    } else if let Some(m) = tail.strip_prefix("alpha") {
        (1, m)
    } else {
        return (0, 0, 0);
    };
    match minor_str.parse::<u32>() {
        Ok(minor) => (level, major, minor),
        Err(_) => (0, 0, 0),
    }
}

/// The served versions of a CRD as resource types.
fn parse_crd(crd: &Value) -> Result<Vec<ResourceType>, String> {
    let name = crd["metadata"]["name"].as_str().unwrap_or_default().to_owned();
    let spec = &crd["spec"];
    let group = spec["group"].as_str().ok_or("spec.group is required")?.to_owned();
    let names = &spec["names"];
    let plural = names["plural"].as_str().ok_or("spec.names.plural is required")?.to_owned();
    let kind = names["kind"].as_str().ok_or("spec.names.kind is required")?.to_owned();
    let singular = names["singular"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| kind.to_ascii_lowercase());
    let list_kind = names["listKind"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| format!("{kind}List"));
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect())
            .unwrap_or_default()
    };
    let short_names = strings(&names["shortNames"]);
    let categories = strings(&names["categories"]);
    let namespaced = match spec["scope"].as_str() {
        Some("Namespaced") => true,
        Some("Cluster") => false,
        other => return Err(format!("spec.scope must be Namespaced or Cluster, not {other:?}")),
    };
    let versions = spec["versions"].as_array().ok_or("spec.versions is required")?;
    let storage = Catalog::crd_storage(&group, &plural);
    let mut types = Vec::new();
    for v in versions {
        if v["served"] != Value::Bool(true) {
            continue;
        }
        let version = v["name"].as_str().ok_or("spec.versions[].name is required")?.to_owned();
        let columns = v["additionalPrinterColumns"]
            .as_array()
            .map(|cols| {
                cols.iter()
                    .map(|c| PrinterColumn {
                        name: c["name"].as_str().unwrap_or_default().to_owned(),
                        type_: c["type"].as_str().unwrap_or("string").to_owned(),
                        format: c["format"].as_str().unwrap_or_default().to_owned(),
                        description: c["description"].as_str().unwrap_or_default().to_owned(),
                        priority: c["priority"].as_i64().unwrap_or(0),
                        json_path: c["jsonPath"].as_str().unwrap_or_default().to_owned(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let schema = v["schema"]["openAPIV3Schema"].clone();
        types.push(ResourceType {
            group: group.clone(),
            version,
            resource: plural.clone(),
            singular: singular.clone(),
            kind: kind.clone(),
            list_kind: list_kind.clone(),
            namespaced,
            short_names: short_names.clone(),
            categories: categories.clone(),
            status_subresource: v["subresources"]["status"].is_object(),
            storage: storage.clone(),
            behaviour: Behaviour::Custom(Arc::new(CustomVersion {
                crd_name: name.clone(),
                schema: (!schema.is_null()).then_some(schema),
                columns,
            })),
        });
    }
    Ok(types)
}

/// Checks a CRD the way the API server's CRD validation does for the parts we rely on.
/// Returns `(field, message)` pairs.
pub fn validate_crd(crd: &Value) -> Vec<(String, String)> {
    let mut errors = Vec::new();
    let spec = &crd["spec"];
    let group = spec["group"].as_str().unwrap_or_default();
    let plural = spec["names"]["plural"].as_str().unwrap_or_default();
    if group.is_empty() {
        errors.push(("spec.group".into(), "Required value".into()));
    } else if !group.contains('.') {
        errors.push(("spec.group".into(), format!("Invalid value: {group:?}: should be a domain with at least one dot")));
    }
    if plural.is_empty() {
        errors.push(("spec.names.plural".into(), "Required value".into()));
    }
    if spec["names"]["kind"].as_str().unwrap_or_default().is_empty() {
        errors.push(("spec.names.kind".into(), "Required value".into()));
    }
    let name = crd["metadata"]["name"].as_str().unwrap_or_default();
    if !group.is_empty() && !plural.is_empty() && name != format!("{plural}.{group}") {
        errors.push((
            "metadata.name".into(),
            format!("Invalid value: {name:?}: must be spec.names.plural+\".\"+spec.group"),
        ));
    }
    match spec["scope"].as_str() {
        Some("Namespaced" | "Cluster") => {}
        other => errors.push((
            "spec.scope".into(),
            format!("Unsupported value: {}: supported values: \"Cluster\", \"Namespaced\"", other.map(|s| format!("{s:?}")).unwrap_or_else(|| "\"\"".into())),
        )),
    }
    let versions = spec["versions"].as_array().map(Vec::as_slice).unwrap_or_default();
    if versions.is_empty() {
        errors.push(("spec.versions".into(), "Invalid value: null: must have exactly one version marked as storage version".into()));
    } else {
        let storage = versions.iter().filter(|v| v["storage"] == Value::Bool(true)).count();
        if storage != 1 {
            errors.push((
                "spec.versions".into(),
                format!("Invalid value: {storage}: must have exactly one version marked as storage version"),
            ));
        }
        let mut seen = BTreeMap::new();
        for (i, v) in versions.iter().enumerate() {
            let n = v["name"].as_str().unwrap_or_default();
            if version_priority(n) == (0, 0, 0) && !n.is_empty() && !n.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()) {
                errors.push((format!("spec.versions[{i}].name"), format!("Invalid value: {n:?}: must be a DNS-1035 label")));
            }
            if seen.insert(n.to_owned(), i).is_some() {
                errors.push((format!("spec.versions[{i}].name"), format!("Duplicate value: {n:?}")));
            }
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_order_follows_kubernetes() {
        let mut versions = vec!["v1alpha1", "v2", "v1beta2", "v1", "v1beta1", "foo", "v10"];
        versions.sort_by_key(|v| std::cmp::Reverse(version_priority(v)));
        assert_eq!(versions, ["v10", "v2", "v1", "v1beta2", "v1beta1", "v1alpha1", "foo"]);
    }

    #[test]
    fn registers_the_session_crd() {
        let crd = serde_json::to_value(serde_yaml::from_str::<Value>(&wa_api::crd::crd_yaml()).unwrap()).unwrap();
        assert!(validate_crd(&crd).is_empty(), "{:?}", validate_crd(&crd));
        let mut catalog = Catalog::new();
        catalog.register_crd(&crd).unwrap();
        let t = catalog.find("wa-operator.dev", "v1alpha1", "whatsappsessions").unwrap();
        assert_eq!(t.kind, "WhatsAppSession");
        assert!(t.namespaced && t.status_subresource);
        assert_eq!(t.short_names, ["wa"]);
        let cols: Vec<_> = t.custom().unwrap().columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(cols, ["Phase", "Account", "Engine", "Age"]);
        assert_eq!(catalog.groups().last().map(String::as_str), Some("wa-operator.dev"));
        catalog.unregister_crd("whatsappsessions.wa-operator.dev");
        assert!(catalog.find("wa-operator.dev", "v1alpha1", "whatsappsessions").is_none());
    }

    #[test]
    fn crd_validation_names_the_field() {
        let crd = serde_json::json!({
            "metadata": {"name": "things.example"},
            "spec": {"group": "example.com", "names": {"plural": "things", "kind": "Thing"}, "scope": "Global",
                     "versions": [{"name": "v1", "served": true, "storage": false}]}
        });
        let fields: Vec<String> = validate_crd(&crd).into_iter().map(|(f, _)| f).collect();
        assert_eq!(fields, ["metadata.name", "spec.scope", "spec.versions"]);
    }
}
