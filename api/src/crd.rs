//! The `WhatsAppSession` custom resource (`wa-operator.dev/v1alpha1`).
//!
//! Doc comments on fields become the schema's descriptions, which is what `kubectl explain`
//! shows; write them for the platform engineer reading a manifest.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ids::PhoneNumber;

/// Desired state of one WhatsApp (Web, multi-device) session: one WhatsApp account linked as
/// a companion device, run by exactly one session pod with its auth state on a volume.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "wa-operator.dev",
    version = "v1alpha1",
    kind = "WhatsAppSession",
    plural = "whatsappsessions",
    singular = "whatsappsession",
    shortname = "wa",
    namespaced,
    status = "WhatsAppSessionStatus",
    category = "all",
    doc = "A WhatsApp (Web, multi-device) session run by wa-operator: one session pod and one auth volume per object.",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase","description":"Where the session is in its life cycle"}"#,
    printcolumn = r#"{"name":"Account","type":"string","jsonPath":".status.account.jid","description":"WhatsApp account the session is linked to"}"#,
    printcolumn = r#"{"name":"Engine","type":"string","jsonPath":".spec.engine","description":"whatsapp or sandbox"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct WhatsAppSessionSpec {
    /// Which engine runs the session: `whatsapp` connects to WhatsApp's servers; `sandbox`
    /// simulates WhatsApp (pairing, receipts, inbound messages) for development and tests.
    #[serde(default)]
    pub engine: Engine,

    /// Phone number of the WhatsApp account in E.164 form (`+15551234567`). When set, the
    /// session pairs by an 8-character pair code entered on the phone instead of a QR scan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^\+[1-9][0-9]{6,14}$"))]
    pub phone_number: Option<String>,

    /// Stop the session: the pod is removed, the auth volume kept, phase becomes Suspended.
    /// Set back to false to resume without a new scan.
    #[serde(default)]
    pub suspend: bool,

    /// Log the companion device out of the WhatsApp account when this object is deleted,
    /// so it disappears from the phone's linked devices. Off by default: deleting the object
    /// then keeps the link, and re-creating it reconnects without a scan.
    #[serde(default)]
    pub logout_on_delete: bool,

    /// The persistent volume holding the session's auth state (keys, identity, Signal sessions).
    #[serde(default)]
    pub storage: StorageSpec,

    /// Compute resources of the session pod. Defaults: requests 32Mi memory and 10m CPU,
    /// limit 256Mi memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Container image of the session pod, overriding the operator's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,

    /// Pacing of outgoing messages, enforced by the session pod (protects the account from
    /// being flagged for sending too fast).
    #[serde(default)]
    pub rate_limit: RateLimitSpec,

    /// HTTP endpoints that receive this session's events (inbound messages, receipts, state
    /// changes), signed with HMAC-SHA256 when a secret is given.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<WebhookSpec>,
}

impl WhatsAppSessionSpec {
    /// The phone number parsed; `None` when unset. The schema already refuses bad numbers,
    /// so an error here means the object bypassed validation.
    pub fn phone(&self) -> Result<Option<PhoneNumber>, crate::ids::IdError> {
        self.phone_number.as_deref().map(str::parse).transpose()
    }
}

/// The engine a session runs on.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// The real WhatsApp Web multi-device protocol.
    #[default]
    Whatsapp,
    /// A simulation of WhatsApp's side for development and tests; never substituted silently.
    Sandbox,
}

impl Engine {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Whatsapp => "whatsapp",
            Self::Sandbox => "sandbox",
        }
    }
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Engine {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "whatsapp" => Ok(Self::Whatsapp),
            "sandbox" => Ok(Self::Sandbox),
            other => Err(format!("unknown engine {other:?}: expected whatsapp or sandbox")),
        }
    }
}

/// The auth volume.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Size of the PersistentVolumeClaim. The auth store needs a few megabytes.
    #[serde(default = "default_storage_size")]
    pub size: Quantity,

    /// StorageClass of the claim; the cluster default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,

    /// Keep the volume when this object is deleted, so re-creating the session reconnects
    /// without a new scan. When false, the volume is deleted with the session.
    #[serde(default = "default_true")]
    pub retain_on_delete: bool,
}

impl Default for StorageSpec {
    fn default() -> Self {
        Self {
            size: default_storage_size(),
            storage_class_name: None,
            retain_on_delete: true,
        }
    }
}

fn default_storage_size() -> Quantity {
    Quantity("256Mi".to_owned())
}

fn default_true() -> bool {
    true
}

/// Token-bucket pacing of sends.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitSpec {
    /// Sustained sends per minute.
    #[serde(default = "default_messages_per_minute")]
    #[schemars(range(min = 1, max = 6000))]
    pub messages_per_minute: u32,

    /// Sends allowed at once above the sustained rate.
    #[serde(default = "default_burst")]
    #[schemars(range(min = 1, max = 1000))]
    pub burst: u32,
}

impl Default for RateLimitSpec {
    fn default() -> Self {
        Self {
            messages_per_minute: default_messages_per_minute(),
            burst: default_burst(),
        }
    }
}

fn default_messages_per_minute() -> u32 {
    30
}

fn default_burst() -> u32 {
    5
}

/// One webhook endpoint.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookSpec {
    /// http(s) URL that receives a POST per event.
    #[schemars(regex(pattern = r"^https?://[^\s/$.?#][^\s]*$"), length(max = 2048))]
    pub url: String,

    /// Which events to deliver; all when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<WebhookEvent>,

    /// Secret key holding the HMAC-SHA256 signing secret. Unsigned deliveries when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeyRef>,
}

/// Kinds of events a webhook can subscribe to.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum WebhookEvent {
    /// An inbound message.
    Message,
    /// A delivery or read receipt for a sent message.
    Receipt,
    /// A change of the session's phase.
    State,
}

/// A key in a Secret in the session's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    pub name: String,
    /// Key within the Secret.
    pub key: String,
}

/// Observed state of a session.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WhatsAppSessionStatus {
    /// Where the session is: Pending, Starting, AwaitingScan, Connected, Reconnecting,
    /// LoggedOut, Suspended or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,

    /// Ready (the pod answers), Paired (linked to an account), Connected (online with
    /// WhatsApp), following Kubernetes API conventions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// The WhatsApp account the session is linked to, once paired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<Account>,

    /// The engine the running pod reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<Engine>,

    /// Name of the session's pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,

    /// The metadata.generation this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Human-readable detail about the phase (the last error, what to do next).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The linked WhatsApp account.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Account {
    /// The account's JID (`15551234567@s.whatsapp.net`).
    pub jid: String,
    /// The display name set on the phone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_name: Option<String>,
}

/// The life-cycle phase of a session. The session pod reports Starting, AwaitingScan,
/// Connected, Reconnecting, LoggedOut and Failed; the operator adds Pending (no pod yet)
/// and Suspended.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum Phase {
    /// Accepted, no pod yet.
    Pending,
    /// The pod is starting or the engine is connecting.
    Starting,
    /// Not paired: waiting for a QR scan or a pair code.
    AwaitingScan,
    /// Paired and online.
    Connected,
    /// Paired, connection lost, reconnecting with backoff.
    Reconnecting,
    /// The account removed this device (or it logged out); a new scan is needed.
    LoggedOut,
    /// `spec.suspend` is true; no pod runs.
    Suspended,
    /// Cannot run; see `status.message`.
    Failed,
}

impl Phase {
    pub const ALL: [Phase; 8] = [
        Phase::Pending,
        Phase::Starting,
        Phase::AwaitingScan,
        Phase::Connected,
        Phase::Reconnecting,
        Phase::LoggedOut,
        Phase::Suspended,
        Phase::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Starting => "Starting",
            Self::AwaitingScan => "AwaitingScan",
            Self::Connected => "Connected",
            Self::Reconnecting => "Reconnecting",
            Self::LoggedOut => "LoggedOut",
            Self::Suspended => "Suspended",
            Self::Failed => "Failed",
        }
    }

    /// Whether a session in this phase is linked to an account.
    pub fn is_paired(self) -> bool {
        matches!(self, Self::Connected | Self::Reconnecting)
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Condition types on `status.conditions`.
pub mod condition {
    /// The session pod exists and answers its readiness probe.
    pub const READY: &str = "Ready";
    /// The session is linked to a WhatsApp account.
    pub const PAIRED: &str = "Paired";
    /// The session is online with WhatsApp and can send.
    pub const CONNECTED: &str = "Connected";
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn minimal_manifest_gets_defaults() {
        let s: WhatsAppSession = serde_yaml::from_str(
            "apiVersion: wa-operator.dev/v1alpha1\nkind: WhatsAppSession\nmetadata: {name: a}\nspec: {}\n",
        )
        .unwrap();
        assert_eq!(s.spec.engine, Engine::Whatsapp);
        assert!(s.spec.storage.retain_on_delete);
        assert_eq!(s.spec.storage.size.0, "256Mi");
        assert_eq!(s.spec.rate_limit, RateLimitSpec { messages_per_minute: 30, burst: 5 });
        assert!(!s.spec.suspend && !s.spec.logout_on_delete);
    }

    #[test]
    fn crd_identity() {
        let crd = WhatsAppSession::crd();
        assert_eq!(crd.metadata.name.as_deref(), Some("whatsappsessions.wa-operator.dev"));
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.short_names, Some(vec!["wa".to_owned()]));
        let v = &crd.spec.versions[0];
        assert!(v.subresources.as_ref().unwrap().status.is_some());
        let cols: Vec<_> = v
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(cols, ["Phase", "Account", "Engine", "Age"]);
    }

    #[test]
    fn schema_validates_phone_and_describes_fields() {
        let yaml = serde_yaml::to_string(&WhatsAppSession::crd()).unwrap();
        assert!(yaml.contains(r"^\+[1-9][0-9]{6,14}$"), "phone pattern missing");
        assert!(yaml.contains("x-kubernetes-list-map-keys"), "conditions must be a list-map");
        assert!(yaml.contains("pair code entered on the phone"), "descriptions missing");
    }

    #[test]
    fn phone_parses_from_spec() {
        let mut spec: WhatsAppSessionSpec = serde_json::from_str("{}").unwrap();
        assert_eq!(spec.phone().unwrap(), None);
        spec.phone_number = Some("+15551234567".into());
        assert_eq!(spec.phone().unwrap().unwrap().digits(), "15551234567");
        spec.phone_number = Some("555".into());
        assert!(spec.phone().is_err());
    }
}

/// The CRD as YAML, exactly as committed in `crds/whatsappsession.yaml`.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let yaml = serde_yaml::to_string(&WhatsAppSession::crd())
        .unwrap_or_else(|e| unreachable!("a CRD always serializes: {e}"));
    format!("# Generated by `cargo run -p wa-api --bin crdgen`; do not edit.\n{yaml}")
}
