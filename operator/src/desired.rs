//! Desired state: a session's spec → its token Secret, auth PVC and Pod.
//!
//! Pure functions of plain data, no I/O: the reconciler fetches, calls these, and applies
//! what they return. Everything here is tested with tables of specs (see the tests below).

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    HTTPGetAction, LocalObjectReference, ObjectFieldSelector, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeClaimVolumeSource, Pod, PodSecurityContext, PodSpec, Probe,
    ResourceRequirements, SeccompProfile, Secret, SecretKeySelector, SecurityContext, Volume,
    VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use sha2::{Digest, Sha256};
use wa_api::crd::StorageSpec;
use wa_api::names;
use wa_api::pod::env;
use wa_api::{ErrorCode, SessionName, WhatsAppSession, WhatsAppSessionSpec};

/// UID and GID the session pod runs as (the distroless "nonroot" user).
pub const POD_UID: i64 = 65532;
/// Seconds the kubelet waits after SIGTERM; the session pod stops in ≤ 5 s.
pub const TERMINATION_GRACE_SECONDS: i64 = 10;
/// The container's name inside the session pod.
pub const CONTAINER_NAME: &str = "session";
/// The executable in the session image.
pub const COMMAND: &str = "wa-session";
/// Value of `app.kubernetes.io/managed-by` on everything the operator creates.
pub const MANAGED_BY: &str = "wa-operator";
/// `app.kubernetes.io/component` values.
pub const COMPONENT_POD: &str = "pod";
pub const COMPONENT_AUTH: &str = "auth";
pub const COMPONENT_TOKEN: &str = "token";
/// Label selector matching every object the operator manages.
pub const MANAGED_SELECTOR: &str = "app.kubernetes.io/managed-by=wa-operator";

/// Operator-wide settings that shape every pod (from the operator's flags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSettings {
    /// Image used when `spec.image` is unset.
    pub default_image: String,
    /// `<gateway>/internal/v1/events`, or `None` when the operator has no `--gateway-url`.
    pub events_url: Option<String>,
    /// Extra `NAME=value` env of every session container (`--session-env`), after the
    /// operator's own variables; e.g. pointing the whatsapp engine at a test server.
    pub extra_env: Vec<(String, String)>,
    /// Secrets the kubelet pulls the session image with (`--session-image-pull-secret`),
    /// in the session's namespace.
    pub image_pull_secrets: Vec<String>,
}

impl PodSettings {
    /// Settings from the operator's flags; `gateway_url` is the gateway's base URL.
    pub fn new(default_image: impl Into<String>, gateway_url: Option<&str>) -> Self {
        Self {
            default_image: default_image.into(),
            events_url: gateway_url
                .map(|u| format!("{}/internal/v1/events", u.trim_end_matches('/'))),
            extra_env: Vec::new(),
            image_pull_secrets: Vec::new(),
        }
    }

    /// The same settings with `imagePullSecrets` on every session pod.
    pub fn with_image_pull_secrets(mut self, names: Vec<String>) -> Self {
        self.image_pull_secrets = names;
        self
    }

    /// The same settings with extra env for every session container.
    pub fn with_extra_env(mut self, extra_env: Vec<(String, String)>) -> Self {
        self.extra_env = extra_env;
        self
    }
}

/// Env names the operator sets itself from the session's spec and its own flags; extra env
/// may not shadow them (with two entries of one name, the last one silently wins).
pub const OPERATOR_ENV: &[&str] = &[
    "POD_IP",
    env::LISTEN,
    env::ENGINE,
    env::DATA_DIR,
    env::TOKEN,
    env::SESSION,
    env::NAMESPACE,
    env::RATE_PER_MINUTE,
    env::RATE_BURST,
    env::EVENTS_URL,
    env::PHONE_NUMBER,
];

/// The session object's identity: a validated name, its namespace and the owner reference
/// its children carry.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRef {
    pub name: SessionName,
    pub namespace: String,
    pub owner: OwnerReference,
}

/// Why a session cannot run as specified. Shown in `status.message` and an Event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message} ({code})")]
pub struct SpecProblem {
    pub field: &'static str,
    pub code: ErrorCode,
    pub message: String,
}

impl SpecProblem {
    fn new(field: &'static str, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            field,
            code,
            message: message.into(),
        }
    }
}

impl SessionRef {
    /// The identity of a session object as the API server returned it.
    pub fn of(session: &WhatsAppSession) -> Result<Self, SpecProblem> {
        let name: SessionName = session
            .name_any()
            .parse()
            .map_err(|e: wa_api::ids::IdError| {
                SpecProblem::new(
                    "metadata.name",
                    ErrorCode::InvalidSessionName,
                    e.to_string(),
                )
            })?;
        let namespace = session.namespace().ok_or_else(|| {
            SpecProblem::new(
                "metadata.namespace",
                ErrorCode::ValidationFailed,
                "the object has no namespace",
            )
        })?;
        let mut owner = session.controller_owner_ref(&()).ok_or_else(|| {
            SpecProblem::new(
                "metadata.uid",
                ErrorCode::ValidationFailed,
                "the object has no uid",
            )
        })?;
        // As Kubernetes' own controllers do: a foreground deletion of the session waits until
        // its pod is gone. Needs `update` on whatsappsessions/finalizers (see rbac.rs).
        owner.block_owner_deletion = Some(true);
        Ok(Self {
            name,
            namespace,
            owner,
        })
    }

    pub fn uid(&self) -> &str {
        &self.owner.uid
    }
}

/// Checks what the CRD schema checks too, because objects can bypass it (an older CRD
/// version, a server without validation): a spec the pod would refuse never becomes a pod.
pub fn validate(spec: &WhatsAppSessionSpec) -> Result<(), SpecProblem> {
    spec.phone().map_err(|e| {
        SpecProblem::new(
            "spec.phoneNumber",
            ErrorCode::InvalidPhoneNumber,
            e.to_string(),
        )
    })?;
    let rl = &spec.rate_limit;
    if !(1..=6000).contains(&rl.messages_per_minute) {
        return Err(SpecProblem::new(
            "spec.rateLimit.messagesPerMinute",
            ErrorCode::ValidationFailed,
            format!("must be 1-6000 (got {})", rl.messages_per_minute),
        ));
    }
    if !(1..=1000).contains(&rl.burst) {
        return Err(SpecProblem::new(
            "spec.rateLimit.burst",
            ErrorCode::ValidationFailed,
            format!("must be 1-1000 (got {})", rl.burst),
        ));
    }
    if let Some(image) = &spec.image
        && (image.trim().is_empty() || image.chars().any(char::is_whitespace))
    {
        return Err(SpecProblem::new(
            "spec.image",
            ErrorCode::ValidationFailed,
            format!("must be an image reference without spaces (got {image:?})"),
        ));
    }
    match quantity_bytes(&spec.storage.size.0) {
        Some(b) if b >= 1.0 => {}
        _ => {
            return Err(SpecProblem::new(
                "spec.storage.size",
                ErrorCode::ValidationFailed,
                format!(
                    "must be a positive quantity such as 256Mi (got {:?})",
                    spec.storage.size.0
                ),
            ));
        }
    }
    if let Some(class) = &spec.storage.storage_class_name
        && class.is_empty()
    {
        return Err(SpecProblem::new(
            "spec.storage.storageClassName",
            ErrorCode::ValidationFailed,
            "must not be empty; leave it out for the cluster default",
        ));
    }
    Ok(())
}

/// Labels of every object of a session; `component` tells which one it is.
pub fn labels(session: &SessionName, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (names::LABEL_NAME.to_owned(), names::APP_NAME.to_owned()),
        (
            names::LABEL_INSTANCE.to_owned(),
            session.as_str().to_owned(),
        ),
        (names::LABEL_COMPONENT.to_owned(), component.to_owned()),
        (names::LABEL_MANAGED_BY.to_owned(), MANAGED_BY.to_owned()),
        (names::LABEL_SESSION.to_owned(), session.as_str().to_owned()),
    ])
}

/// A new random pod token: 32 bytes from the OS-seeded CSPRNG, hex.
pub fn new_token() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// A short, one-way fingerprint of the token. It goes into the pod's spec hash so that a
/// replaced Secret (new token) rolls the pod, which reads the token only at start.
pub fn token_fingerprint(token: &str) -> String {
    hex::encode(&Sha256::digest(token.as_bytes())[..8])
}

/// The Secret `wa-<name>-token` holding the pod's API token. Owned by the session, so it
/// goes with it.
pub fn token_secret(session: &SessionRef, token: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(names::secret_name(session.name.as_str())),
            namespace: Some(session.namespace.clone()),
            labels: Some(labels(&session.name, COMPONENT_TOKEN)),
            owner_references: Some(vec![session.owner.clone()]),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(BTreeMap::from([(
            names::SECRET_TOKEN_KEY.to_owned(),
            ByteString(token.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    }
}

/// The token in a Secret, when it holds a usable one.
pub fn token_of(secret: &Secret) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(names::SECRET_TOKEN_KEY)?;
    let token = std::str::from_utf8(&bytes.0).ok()?;
    // The pod compares the token it is given with the bearer header; whitespace would never match.
    (!token.is_empty() && !token.chars().any(char::is_whitespace)).then(|| token.to_owned())
}

/// The PVC `wa-<name>-auth`. Owned by the session (deleted with it by the garbage collector)
/// only when `retainOnDelete` is false; a retained claim carries no owner, so it survives
/// and a session re-created with the same name finds it again by name.
pub fn auth_pvc(session: &SessionRef, storage: &StorageSpec) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(names::pvc_name(session.name.as_str())),
            namespace: Some(session.namespace.clone()),
            labels: Some(labels(&session.name, COMPONENT_AUTH)),
            owner_references: (!storage.retain_on_delete).then(|| vec![session.owner.clone()]),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_owned(),
                    storage.size.clone(),
                )])),
                limits: None,
            }),
            storage_class_name: storage.storage_class_name.clone(),
            ..PersistentVolumeClaimSpec::default()
        }),
        status: None,
    }
}

/// The claim to apply when one already exists: a claim's class, access modes and volume
/// mode are immutable and it can only grow, so those follow the existing claim. Returns
/// the claim and, when the spec asks for something the claim cannot do, why it was kept.
pub fn auth_pvc_update(
    desired: PersistentVolumeClaim,
    existing: &PersistentVolumeClaim,
) -> (PersistentVolumeClaim, Option<String>) {
    let mut pvc = desired;
    let mut notes = Vec::new();
    let (Some(spec), Some(current)) = (pvc.spec.as_mut(), existing.spec.as_ref()) else {
        return (pvc, None);
    };
    if spec.storage_class_name.is_some() && spec.storage_class_name != current.storage_class_name {
        notes.push(format!(
            "storageClassName cannot change on an existing claim; keeping {:?}",
            current.storage_class_name.as_deref().unwrap_or("")
        ));
    }
    spec.storage_class_name = current.storage_class_name.clone();
    spec.access_modes = current.access_modes.clone();
    spec.volume_mode = current.volume_mode.clone();
    let current_size = current
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .cloned();
    let wanted = spec
        .resources
        .as_mut()
        .and_then(|r| r.requests.as_mut())
        .and_then(|r| r.get_mut("storage"));
    if let (Some(wanted), Some(current_size)) = (wanted, current_size) {
        let shrink = match (quantity_bytes(&wanted.0), quantity_bytes(&current_size.0)) {
            (Some(w), Some(c)) => w < c,
            _ => false,
        };
        if shrink {
            notes.push(format!(
                "a claim cannot shrink; keeping {} (spec asks {})",
                current_size.0, wanted.0
            ));
            *wanted = current_size;
        }
    }
    let note = (!notes.is_empty()).then(|| notes.join("; "));
    (pvc, note)
}

fn default_resources() -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("memory".to_owned(), Quantity("32Mi".to_owned())),
            ("cpu".to_owned(), Quantity("10m".to_owned())),
        ])),
        limits: Some(BTreeMap::from([(
            "memory".to_owned(),
            Quantity("256Mi".to_owned()),
        )])),
        ..ResourceRequirements::default()
    }
}

fn plain_env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.into()),
        value_from: None,
    }
}

/// The env of the session container: all of `wa-session`'s configuration.
fn pod_env(
    session: &SessionRef,
    spec: &WhatsAppSessionSpec,
    settings: &PodSettings,
) -> Vec<EnvVar> {
    let mut env = vec![
        // Before WA_LISTEN: the kubelet expands $(VAR) only from variables defined earlier.
        EnvVar {
            name: "POD_IP".to_owned(),
            value: None,
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    api_version: Some("v1".to_owned()),
                    field_path: "status.podIP".to_owned(),
                }),
                ..EnvVarSource::default()
            }),
        },
        // The pod IP, not 0.0.0.0: under the test pod runner every pod shares the host's
        // network with its own loopback address, and in a cluster it is equivalent. Bare (the
        // pod listens on POD_PORT): `$(POD_IP):8080` is no address for an IPv6 pod IP.
        plain_env(env::LISTEN, "$(POD_IP)"),
        plain_env(env::ENGINE, spec.engine.as_str()),
        plain_env(env::DATA_DIR, names::POD_DATA_DIR),
        EnvVar {
            name: env::TOKEN.to_owned(),
            value: None,
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: names::secret_name(session.name.as_str()),
                    key: names::SECRET_TOKEN_KEY.to_owned(),
                    optional: Some(false),
                }),
                ..EnvVarSource::default()
            }),
        },
        plain_env(env::SESSION, session.name.as_str()),
        plain_env(env::NAMESPACE, session.namespace.clone()),
        plain_env(
            env::RATE_PER_MINUTE,
            spec.rate_limit.messages_per_minute.to_string(),
        ),
        plain_env(env::RATE_BURST, spec.rate_limit.burst.to_string()),
    ];
    if let Some(url) = &settings.events_url {
        env.push(plain_env(env::EVENTS_URL, url.clone()));
    }
    if let Some(phone) = &spec.phone_number {
        env.push(plain_env(env::PHONE_NUMBER, phone.clone()));
    }
    env.extend(
        settings
            .extra_env
            .iter()
            .map(|(name, value)| plain_env(name, value.clone())),
    );
    env
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::Int(i32::from(names::POD_PORT)),
            scheme: Some("HTTP".to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(2),
        failure_threshold: Some(failures),
        ..Probe::default()
    }
}

/// The session's Pod `wa-<name>`, with the spec-hash annotation set.
/// `token_fingerprint` is [`token_fingerprint`] of the Secret's current token.
pub fn session_pod(
    session: &SessionRef,
    spec: &WhatsAppSessionSpec,
    settings: &PodSettings,
    token_fingerprint: &str,
) -> Pod {
    let image = spec
        .image
        .clone()
        .unwrap_or_else(|| settings.default_image.clone());
    let container = Container {
        name: CONTAINER_NAME.to_owned(),
        image: Some(image),
        command: Some(vec![COMMAND.to_owned()]),
        env: Some(pod_env(session, spec, settings)),
        ports: Some(vec![ContainerPort {
            name: Some("http".to_owned()),
            container_port: i32::from(names::POD_PORT),
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        }]),
        readiness_probe: Some(http_probe("/readyz", 2, 3)),
        liveness_probe: Some(Probe {
            initial_delay_seconds: Some(5),
            ..http_probe("/healthz", 10, 3)
        }),
        resources: Some(spec.resources.clone().unwrap_or_else(default_resources)),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                add: None,
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "data".to_owned(),
                mount_path: names::POD_DATA_DIR.to_owned(),
                ..VolumeMount::default()
            },
            // The root filesystem is read-only; SQLite and the HTTP stack may need scratch space.
            VolumeMount {
                name: "tmp".to_owned(),
                mount_path: "/tmp".to_owned(),
                ..VolumeMount::default()
            },
        ]),
        ..Container::default()
    };
    let pod_spec = PodSpec {
        containers: vec![container],
        image_pull_secrets: (!settings.image_pull_secrets.is_empty()).then(|| {
            settings
                .image_pull_secrets
                .iter()
                .map(|name| LocalObjectReference { name: name.clone() })
                .collect()
        }),
        restart_policy: Some("Always".to_owned()),
        termination_grace_period_seconds: Some(TERMINATION_GRACE_SECONDS),
        // The session pod never talks to the Kubernetes API (ARCHITECTURE.md invariant).
        automount_service_account_token: Some(false),
        // Thousands of sessions mean thousands of Services' env vars otherwise.
        enable_service_links: Some(false),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(POD_UID),
            run_as_group: Some(POD_UID),
            fs_group: Some(POD_UID),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                localhost_profile: None,
            }),
            ..PodSecurityContext::default()
        }),
        volumes: Some(vec![
            Volume {
                name: "data".to_owned(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: names::pvc_name(session.name.as_str()),
                    read_only: Some(false),
                }),
                ..Volume::default()
            },
            Volume {
                name: "tmp".to_owned(),
                empty_dir: Some(EmptyDirVolumeSource {
                    size_limit: Some(Quantity("16Mi".to_owned())),
                    medium: None,
                }),
                ..Volume::default()
            },
        ]),
        ..PodSpec::default()
    };
    let labels = labels(&session.name, COMPONENT_POD);
    let hash = spec_hash(&labels, &pod_spec, token_fingerprint);
    Pod {
        metadata: ObjectMeta {
            name: Some(names::pod_name(session.name.as_str())),
            namespace: Some(session.namespace.clone()),
            labels: Some(labels),
            annotations: Some(BTreeMap::from([(
                names::ANNOTATION_SPEC_HASH.to_owned(),
                hash,
            )])),
            owner_references: Some(vec![session.owner.clone()]),
            ..ObjectMeta::default()
        },
        spec: Some(pod_spec),
        status: None,
    }
}

/// Hash of everything the operator puts into a pod. Hashing the rendered pod (not the
/// session spec) means any change that would produce a different pod rolls it: a spec
/// field, a new default image or gateway URL after an operator upgrade, a replaced token.
fn spec_hash(labels: &BTreeMap<String, String>, spec: &PodSpec, token_fingerprint: &str) -> String {
    let mut h = Sha256::new();
    // Serializing k8s-openapi types is deterministic: struct fields in order, maps are BTreeMaps.
    h.update(serde_json::to_vec(labels).unwrap_or_default());
    h.update(b"\0");
    h.update(serde_json::to_vec(spec).unwrap_or_default());
    h.update(b"\0");
    h.update(token_fingerprint.as_bytes());
    hex::encode(&h.finalize()[..8])
}

/// The spec hash a pod was created with.
pub fn pod_spec_hash(pod: &Pod) -> Option<&str> {
    pod.annotations()
        .get(names::ANNOTATION_SPEC_HASH)
        .map(String::as_str)
}

/// A Kubernetes quantity (`256Mi`, `1G`, `1.5Gi`, `1e9`) in bytes; `None` when malformed.
pub fn quantity_bytes(q: &str) -> Option<f64> {
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    let number: f64 = number.parse().ok()?;
    let factor = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024.0_f64.powi(2),
        "Gi" => 1024.0_f64.powi(3),
        "Ti" => 1024.0_f64.powi(4),
        "Pi" => 1024.0_f64.powi(5),
        "Ei" => 1024.0_f64.powi(6),
        s if s.starts_with(['e', 'E']) => 10f64.powi(s[1..].parse::<i32>().ok()?),
        _ => return None,
    };
    let bytes = number * factor;
    (bytes.is_finite() && bytes >= 0.0).then_some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ResourceRequirements;
    use serde_json::{Value, json};

    fn session(spec: Value) -> WhatsAppSession {
        serde_json::from_value(json!({
            "apiVersion": "wa-operator.dev/v1alpha1",
            "kind": "WhatsAppSession",
            "metadata": {"name": "support", "namespace": "team-a", "uid": "uid-1"},
            "spec": spec,
        }))
        .unwrap()
    }

    fn settings() -> PodSettings {
        PodSettings::new(
            "ghcr.io/wa-operator/wa-session:0.1.0",
            Some("http://gw.wa:8080/"),
        )
    }

    fn pod_for(spec: Value) -> Pod {
        let s = session(spec);
        session_pod(&SessionRef::of(&s).unwrap(), &s.spec, &settings(), "fp")
    }

    fn container(pod: &Pod) -> &Container {
        &pod.spec.as_ref().unwrap().containers[0]
    }

    fn env_of(pod: &Pod) -> BTreeMap<String, Value> {
        container(pod)
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| {
                let v = match (&e.value, &e.value_from) {
                    (Some(v), None) => json!(v),
                    (None, Some(from)) => serde_json::to_value(from).unwrap(),
                    other => panic!("env {} has {other:?}", e.name),
                };
                (e.name.clone(), v)
            })
            .collect()
    }

    /// One row per spec field: the spec, then what must hold in the pod's env.
    #[test]
    fn env_follows_every_spec_field() {
        let check = |spec: Value, expected: &[(&str, Option<&str>)]| {
            let env = env_of(&pod_for(spec.clone()));
            for (name, value) in expected {
                assert_eq!(
                    env.get(*name).and_then(Value::as_str),
                    *value,
                    "{name} for spec {spec}"
                );
            }
        };
        // Defaults.
        check(
            json!({}),
            &[
                (env::ENGINE, Some("whatsapp")),
                (env::DATA_DIR, Some("/data")),
                (env::LISTEN, Some("$(POD_IP)")),
                (env::SESSION, Some("support")),
                (env::NAMESPACE, Some("team-a")),
                (env::RATE_PER_MINUTE, Some("30")),
                (env::RATE_BURST, Some("5")),
                (
                    env::EVENTS_URL,
                    Some("http://gw.wa:8080/internal/v1/events"),
                ),
                (env::PHONE_NUMBER, None),
            ],
        );
        check(
            json!({"engine": "sandbox"}),
            &[(env::ENGINE, Some("sandbox"))],
        );
        check(
            json!({"phoneNumber": "+15551234567"}),
            &[(env::PHONE_NUMBER, Some("+15551234567"))],
        );
        check(
            json!({"rateLimit": {"messagesPerMinute": 120, "burst": 20}}),
            &[
                (env::RATE_PER_MINUTE, Some("120")),
                (env::RATE_BURST, Some("20")),
            ],
        );
        check(
            json!({"rateLimit": {"burst": 9}}),
            &[
                (env::RATE_PER_MINUTE, Some("30")),
                (env::RATE_BURST, Some("9")),
            ],
        );
    }

    /// What the session pod listens on once the kubelet has expanded `$(POD_IP)`, for IPv4
    /// and IPv6 pods: the pod IP and the port the operator and the gateway call.
    #[test]
    fn listen_address_is_the_pod_ip_on_the_pod_port_for_ipv4_and_ipv6() {
        let env = env_of(&pod_for(json!({})));
        let listen = env[env::LISTEN].as_str().unwrap().to_owned();
        let check = |pod_ip: &str| {
            let expanded = listen.replace("$(POD_IP)", pod_ip);
            let ip: std::net::IpAddr = pod_ip.parse().unwrap();
            assert_eq!(
                wa_api::pod::parse_listen(&expanded),
                Ok(std::net::SocketAddr::new(ip, names::POD_PORT)),
                "pod IP {pod_ip}: WA_LISTEN={expanded}"
            );
        };
        check("10.244.1.7");
        check("127.0.0.9");
        check("fd00:10:244::7");
        check("2001:db8::1:0");
    }

    #[test]
    fn env_token_and_pod_ip_come_from_the_api() {
        let pod = pod_for(json!({}));
        let env = env_of(&pod);
        assert_eq!(
            env["WA_TOKEN"],
            json!({"secretKeyRef": {"name": "wa-support-token", "key": "token", "optional": false}})
        );
        assert_eq!(
            env["POD_IP"],
            json!({"fieldRef": {"apiVersion": "v1", "fieldPath": "status.podIP"}})
        );
        let names: Vec<_> = container(&pod)
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| e.name.as_str())
            .collect();
        let pos = |n| names.iter().position(|x| *x == n).unwrap();
        assert!(
            pos("POD_IP") < pos(env::LISTEN),
            "POD_IP must precede WA_LISTEN for $(POD_IP)"
        );
    }

    /// `--session-env`: appended after the operator's own env, in order, on every pod; a
    /// change rolls the pods (it is part of the rendered pod).
    #[test]
    fn extra_env_is_appended_to_every_pod() {
        let s = session(json!({"engine": "whatsapp"}));
        let r = SessionRef::of(&s).unwrap();
        let check = |extra: &[(&str, &str)]| {
            let extra: Vec<(String, String)> = extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            let pod = session_pod(&r, &s.spec, &settings().with_extra_env(extra.clone()), "fp");
            let all = container(&pod).env.clone().unwrap();
            let tail: Vec<(String, String)> = all[all.len() - extra.len()..]
                .iter()
                .map(|e| (e.name.clone(), e.value.clone().unwrap()))
                .collect();
            assert_eq!(tail, extra);
            assert!(
                all[..all.len() - extra.len()]
                    .iter()
                    .all(|e| !extra.iter().any(|(k, _)| *k == e.name))
            );
            pod
        };
        let base = check(&[]);
        let one = check(&[(env::SERVER_URL, "ws://127.0.0.1:9/ws/chat")]);
        let two = check(&[
            (env::SERVER_URL, "ws://127.0.0.1:9/ws/chat"),
            (env::MEDIA_URL, "http://127.0.0.1:9"),
        ]);
        let hash = |p: &Pod| pod_spec_hash(p).unwrap().to_owned();
        assert_ne!(hash(&base), hash(&one));
        assert_ne!(hash(&one), hash(&two));
        // Every name the operator sets is in OPERATOR_ENV (so the flag can refuse them).
        for e in container(&pod_for(json!({"phoneNumber": "+15551234567"})))
            .env
            .as_ref()
            .unwrap()
        {
            assert!(
                OPERATOR_ENV.contains(&e.name.as_str()),
                "{} is missing from OPERATOR_ENV",
                e.name
            );
        }
    }

    #[test]
    fn events_url_is_omitted_without_a_gateway() {
        let s = session(json!({}));
        let settings = PodSettings::new("img", None);
        let pod = session_pod(&SessionRef::of(&s).unwrap(), &s.spec, &settings, "fp");
        assert!(!env_of(&pod).contains_key(env::EVENTS_URL));
        let with_path = PodSettings::new("img", Some("https://gw.example/base"));
        assert_eq!(
            with_path.events_url.as_deref(),
            Some("https://gw.example/base/internal/v1/events")
        );
    }

    #[test]
    fn image_default_and_override() {
        assert_eq!(
            container(&pod_for(json!({}))).image.as_deref(),
            Some("ghcr.io/wa-operator/wa-session:0.1.0")
        );
        assert_eq!(
            container(&pod_for(json!({"image": "registry.local/wa-session:dev"})))
                .image
                .as_deref(),
            Some("registry.local/wa-session:dev")
        );
        assert_eq!(
            container(&pod_for(json!({}))).command,
            Some(vec!["wa-session".to_owned()])
        );
    }

    #[test]
    fn resources_default_and_override() {
        let default = container(&pod_for(json!({}))).resources.clone().unwrap();
        assert_eq!(
            serde_json::to_value(&default).unwrap(),
            json!({"requests": {"memory": "32Mi", "cpu": "10m"}, "limits": {"memory": "256Mi"}})
        );
        let custom =
            json!({"requests": {"memory": "64Mi"}, "limits": {"memory": "512Mi", "cpu": "1"}});
        let got = container(&pod_for(json!({"resources": custom.clone()})))
            .resources
            .clone()
            .unwrap();
        assert_eq!(
            got,
            serde_json::from_value::<ResourceRequirements>(custom).unwrap()
        );
    }

    #[test]
    fn pod_is_locked_down() {
        let pod = pod_for(json!({}));
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(
            serde_json::to_value(&spec.security_context).unwrap(),
            json!({"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532,
                   "seccompProfile": {"type": "RuntimeDefault"}})
        );
        assert_eq!(
            serde_json::to_value(&container(&pod).security_context).unwrap(),
            json!({"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                   "runAsNonRoot": true, "capabilities": {"drop": ["ALL"]}})
        );
        assert_eq!(spec.restart_policy.as_deref(), Some("Always"));
        assert_eq!(spec.termination_grace_period_seconds, Some(10));
        assert_eq!(spec.automount_service_account_token, Some(false));
        let c = container(&pod);
        let probe_path = |p: &Option<Probe>| {
            p.as_ref()
                .unwrap()
                .http_get
                .as_ref()
                .map(|g| (g.path.clone().unwrap(), g.port.clone()))
        };
        assert_eq!(
            probe_path(&c.readiness_probe),
            Some(("/readyz".into(), IntOrString::Int(8080)))
        );
        assert_eq!(
            probe_path(&c.liveness_probe),
            Some(("/healthz".into(), IntOrString::Int(8080)))
        );
    }

    #[test]
    fn pod_mounts_the_auth_claim_at_the_data_dir() {
        let pod = pod_for(json!({}));
        let spec = pod.spec.as_ref().unwrap();
        let data = spec
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "data")
            .unwrap();
        assert_eq!(
            data.persistent_volume_claim.as_ref().unwrap().claim_name,
            "wa-support-auth"
        );
        let mounts = container(&pod).volume_mounts.as_ref().unwrap();
        assert!(
            mounts
                .iter()
                .any(|m| m.name == "data" && m.mount_path == "/data")
        );
    }

    #[test]
    fn pod_metadata() {
        let pod = pod_for(json!({}));
        assert_eq!(pod.metadata.name.as_deref(), Some("wa-support"));
        assert_eq!(pod.metadata.namespace.as_deref(), Some("team-a"));
        let labels = pod.metadata.labels.as_ref().unwrap();
        assert_eq!(labels["wa-operator.dev/session"], "support");
        assert_eq!(labels["app.kubernetes.io/name"], "wa-session");
        assert_eq!(labels["app.kubernetes.io/instance"], "support");
        assert_eq!(labels["app.kubernetes.io/component"], "pod");
        assert_eq!(labels["app.kubernetes.io/managed-by"], "wa-operator");
        let owner = &pod.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
            ("WhatsAppSession", "support", "uid-1")
        );
        assert_eq!(owner.controller, Some(true));
        assert_eq!(pod_spec_hash(&pod).map(str::len), Some(16));
    }

    /// `--session-image-pull-secret`: one entry per flag, in order, on every session pod;
    /// none without the flag; a change rolls the pods.
    #[test]
    fn image_pull_secrets_follow_the_flag() {
        let s = session(json!({"image": "registry.example/wa-session:1"}));
        let r = SessionRef::of(&s).unwrap();
        let pod_with = |names: &[&str]| {
            let settings = settings()
                .with_image_pull_secrets(names.iter().map(|n| (*n).to_owned()).collect());
            session_pod(&r, &s.spec, &settings, "fp")
        };
        let check = |names: &[&str], expected: Option<Value>| {
            let pod = pod_with(names);
            let got = pod
                .spec
                .as_ref()
                .unwrap()
                .image_pull_secrets
                .as_ref()
                .map(|v| serde_json::to_value(v).unwrap());
            assert_eq!(got, expected, "{names:?}");
        };
        check(&[], None);
        check(&["regcred"], Some(json!([{"name": "regcred"}])));
        check(
            &["regcred", "mirror.pull"],
            Some(json!([{"name": "regcred"}, {"name": "mirror.pull"}])),
        );
        let hash = |names: &[&str]| pod_spec_hash(&pod_with(names)).unwrap().to_owned();
        assert_ne!(hash(&[]), hash(&["regcred"]));
        assert_ne!(hash(&["regcred"]), hash(&["regcred", "mirror.pull"]));
    }

    /// Children point at their session with `blockOwnerDeletion`, which clusters enforcing
    /// owner-reference permissions only accept from a client that may update the session's
    /// finalizers.
    #[test]
    fn owner_references_that_block_deletion_are_allowed_by_rbac() {
        let s = session(json!({"storage": {"retainOnDelete": false}}));
        let r = SessionRef::of(&s).unwrap();
        let owners = [
            session_pod(&r, &s.spec, &settings(), "fp").metadata.owner_references,
            token_secret(&r, "t").metadata.owner_references,
            auth_pvc(&r, &s.spec.storage).metadata.owner_references,
        ];
        for refs in owners {
            let refs = refs.expect("owned by the session");
            assert!(refs.iter().all(|o| o.block_owner_deletion == Some(true)), "{refs:?}");
        }
        assert!(crate::rbac::allows(
            wa_api::names::GROUP,
            "whatsappsessions/finalizers",
            "update"
        ));
    }

    /// Which spec changes roll the pod (new hash) and which must not.
    #[test]
    fn spec_hash_changes_exactly_when_the_pod_would() {
        let base = pod_for(json!({}));
        let hash = |p: &Pod| pod_spec_hash(p).unwrap().to_owned();
        let rolls = [
            json!({"engine": "sandbox"}),
            json!({"phoneNumber": "+15551234567"}),
            json!({"image": "other:1"}),
            json!({"rateLimit": {"messagesPerMinute": 31}}),
            json!({"rateLimit": {"burst": 6}}),
            json!({"resources": {"limits": {"memory": "128Mi"}}}),
        ];
        for spec in rolls {
            assert_ne!(
                hash(&pod_for(spec.clone())),
                hash(&base),
                "{spec} must roll the pod"
            );
        }
        let keeps = [
            json!({"suspend": false}),
            json!({"logoutOnDelete": true}),
            json!({"storage": {"size": "1Gi", "retainOnDelete": false}}),
            json!({"webhooks": [{"url": "https://example.com/hook"}]}),
            json!({"engine": "whatsapp", "rateLimit": {"messagesPerMinute": 30, "burst": 5}}),
        ];
        for spec in keeps {
            assert_eq!(
                hash(&pod_for(spec.clone())),
                hash(&base),
                "{spec} must not roll the pod"
            );
        }
        // A new token (replaced Secret) and operator-wide settings roll it too.
        let s = session(json!({}));
        let r = SessionRef::of(&s).unwrap();
        assert_ne!(
            hash(&session_pod(&r, &s.spec, &settings(), "other-fp")),
            hash(&base)
        );
        let no_gateway = PodSettings::new("ghcr.io/wa-operator/wa-session:0.1.0", None);
        assert_ne!(
            hash(&session_pod(&r, &s.spec, &no_gateway, "fp")),
            hash(&base)
        );
    }

    #[test]
    fn pvc_follows_storage_spec() {
        let check = |spec: Value, size: &str, class: Option<&str>, owned: bool| {
            let s = session(spec.clone());
            let pvc = auth_pvc(&SessionRef::of(&s).unwrap(), &s.spec.storage);
            assert_eq!(
                pvc.metadata.name.as_deref(),
                Some("wa-support-auth"),
                "{spec}"
            );
            let ps = pvc.spec.as_ref().unwrap();
            assert_eq!(
                ps.resources.as_ref().unwrap().requests.as_ref().unwrap()["storage"].0,
                size,
                "{spec}"
            );
            assert_eq!(ps.storage_class_name.as_deref(), class, "{spec}");
            assert_eq!(ps.access_modes, Some(vec!["ReadWriteOnce".to_owned()]));
            assert_eq!(pvc.metadata.owner_references.is_some(), owned, "{spec}");
            assert_eq!(
                pvc.metadata.labels.as_ref().unwrap()["app.kubernetes.io/component"],
                "auth"
            );
        };
        check(json!({}), "256Mi", None, false);
        check(json!({"storage": {"size": "1Gi"}}), "1Gi", None, false);
        check(
            json!({"storage": {"storageClassName": "fast"}}),
            "256Mi",
            Some("fast"),
            false,
        );
        check(
            json!({"storage": {"retainOnDelete": false}}),
            "256Mi",
            None,
            true,
        );
        check(
            json!({"storage": {"retainOnDelete": true}}),
            "256Mi",
            None,
            false,
        );
    }

    #[test]
    fn pvc_update_keeps_what_a_claim_cannot_change() {
        let s = session(json!({"storage": {"size": "128Mi", "storageClassName": "fast"}}));
        let r = SessionRef::of(&s).unwrap();
        let desired = auth_pvc(&r, &s.spec.storage);
        let existing: PersistentVolumeClaim = serde_json::from_value(json!({
            "metadata": {"name": "wa-support-auth"},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "standard",
                     "volumeMode": "Filesystem", "resources": {"requests": {"storage": "256Mi"}}}
        }))
        .unwrap();
        let (pvc, note) = auth_pvc_update(desired, &existing);
        let ps = pvc.spec.unwrap();
        assert_eq!(ps.storage_class_name.as_deref(), Some("standard"));
        assert_eq!(ps.volume_mode.as_deref(), Some("Filesystem"));
        assert_eq!(
            ps.resources.unwrap().requests.unwrap()["storage"].0,
            "256Mi"
        );
        let note = note.unwrap();
        assert!(
            note.contains("storageClassName") && note.contains("cannot shrink"),
            "{note}"
        );

        // Growing is passed on (the API server decides whether the class allows it).
        let s = session(json!({"storage": {"size": "1Gi"}}));
        let (pvc, note) = auth_pvc_update(
            auth_pvc(&SessionRef::of(&s).unwrap(), &s.spec.storage),
            &existing,
        );
        assert_eq!(
            pvc.spec.unwrap().resources.unwrap().requests.unwrap()["storage"].0,
            "1Gi"
        );
        assert_eq!(note, None);
    }

    #[test]
    fn secret_holds_the_token_and_is_owned() {
        let s = session(json!({}));
        let secret = token_secret(&SessionRef::of(&s).unwrap(), "abc123");
        assert_eq!(secret.metadata.name.as_deref(), Some("wa-support-token"));
        assert_eq!(token_of(&secret).as_deref(), Some("abc123"));
        assert_eq!(
            secret.metadata.owner_references.as_ref().unwrap()[0].uid,
            "uid-1"
        );
        assert_eq!(
            secret.metadata.labels.as_ref().unwrap()["app.kubernetes.io/component"],
            "token"
        );
    }

    #[test]
    fn unusable_tokens_are_refused() {
        let s = session(json!({}));
        let r = SessionRef::of(&s).unwrap();
        for bad in ["", "a b", "tok\n"] {
            assert_eq!(token_of(&token_secret(&r, bad)), None, "{bad:?}");
        }
        let mut no_data = token_secret(&r, "x");
        no_data.data = None;
        assert_eq!(token_of(&no_data), None);
        let mut not_utf8 = token_secret(&r, "x");
        not_utf8
            .data
            .as_mut()
            .unwrap()
            .insert("token".into(), ByteString(vec![0xff, 0xfe]));
        assert_eq!(token_of(&not_utf8), None);
    }

    #[test]
    fn tokens_are_random_and_long() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        assert_eq!(token_fingerprint(&a).len(), 16);
        assert_ne!(token_fingerprint(&a), token_fingerprint(&b));
    }

    #[test]
    fn validation() {
        let check = |spec: Value, problem: Option<(&str, ErrorCode)>| {
            let s = session(spec.clone());
            let got = validate(&s.spec).err().map(|p| (p.field, p.code));
            assert_eq!(got, problem, "{spec}");
        };
        check(json!({}), None);
        check(
            json!({"phoneNumber": "+15551234567", "image": "a/b:c", "storage": {"size": "1.5Gi", "storageClassName": "x"}}),
            None,
        );
        check(
            json!({"phoneNumber": "555"}),
            Some(("spec.phoneNumber", ErrorCode::InvalidPhoneNumber)),
        );
        check(
            json!({"rateLimit": {"messagesPerMinute": 0}}),
            Some((
                "spec.rateLimit.messagesPerMinute",
                ErrorCode::ValidationFailed,
            )),
        );
        check(
            json!({"rateLimit": {"burst": 1001}}),
            Some(("spec.rateLimit.burst", ErrorCode::ValidationFailed)),
        );
        check(
            json!({"image": " "}),
            Some(("spec.image", ErrorCode::ValidationFailed)),
        );
        check(
            json!({"storage": {"size": "lots"}}),
            Some(("spec.storage.size", ErrorCode::ValidationFailed)),
        );
        check(
            json!({"storage": {"size": "0"}}),
            Some(("spec.storage.size", ErrorCode::ValidationFailed)),
        );
        check(
            json!({"storage": {"storageClassName": ""}}),
            Some(("spec.storage.storageClassName", ErrorCode::ValidationFailed)),
        );
    }

    #[test]
    fn session_ref_refuses_names_too_long_for_derived_objects() {
        let mut s = session(json!({}));
        s.metadata.name = Some("a".repeat(54));
        let p = SessionRef::of(&s).unwrap_err();
        assert_eq!(p.code, ErrorCode::InvalidSessionName);
        assert!(p.to_string().contains("INVALID_SESSION_NAME"), "{p}");
        s.metadata.name = Some("ok".into());
        s.metadata.uid = None;
        assert_eq!(SessionRef::of(&s).unwrap_err().field, "metadata.uid");
    }

    #[test]
    fn quantities() {
        let check = |q: &str, want: Option<f64>| assert_eq!(quantity_bytes(q), want, "{q}");
        check("256Mi", Some(256.0 * 1024.0 * 1024.0));
        check("1Gi", Some(1024f64.powi(3)));
        check("1.5Gi", Some(1.5 * 1024f64.powi(3)));
        check("1G", Some(1e9));
        check("100", Some(100.0));
        check("1e3", Some(1000.0));
        check("500m", Some(0.5));
        for bad in ["", "Mi", "1Xi", "1..2Gi", "-1Gi", "abc"] {
            check(bad, None);
        }
    }
}
