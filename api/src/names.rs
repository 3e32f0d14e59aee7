//! Deterministic names, labels, annotations and ports shared by the operator, the gateway,
//! the chart and the tests. One definition each, so a rename cannot break the routing.

/// API group of the CRD.
pub const GROUP: &str = "wa-operator.dev";
/// Field manager for every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "wa-operator";
/// Finalizer that runs log-out and PVC clean-up before a session object goes away.
pub const FINALIZER: &str = "wa-operator.dev/cleanup";

/// Label on every object that belongs to a session; its value is the session name.
pub const LABEL_SESSION: &str = "wa-operator.dev/session";
/// Label telling the kind of session object (`pod`, `auth`, `token`).
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
pub const LABEL_NAME: &str = "app.kubernetes.io/name";
pub const LABEL_INSTANCE: &str = "app.kubernetes.io/instance";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const APP_NAME: &str = "wa-session";

/// Hash of the parts of the spec that shape the pod; a change rolls the pod.
pub const ANNOTATION_SPEC_HASH: &str = "wa-operator.dev/spec-hash";

/// Key of the pod token inside the session's Secret.
pub const SECRET_TOKEN_KEY: &str = "token";

/// Port the session pod's HTTP API listens on inside its pod.
pub const POD_PORT: u16 = 8080;
/// Mount path of the auth volume in the session pod.
pub const POD_DATA_DIR: &str = "/data";

/// `wa-<session>`: the session's Pod.
pub fn pod_name(session: &str) -> String {
    format!("wa-{session}")
}

/// `wa-<session>-auth`: the PersistentVolumeClaim holding the session's auth state.
pub fn pvc_name(session: &str) -> String {
    format!("wa-{session}-auth")
}

/// `wa-<session>-token`: the Secret holding the pod's API token.
pub fn secret_name(session: &str) -> String {
    format!("wa-{session}-token")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SessionName;

    #[test]
    fn derived_names_of_the_longest_session_are_dns_labels() {
        let longest: SessionName = "a".repeat(SessionName::MAX_LEN).parse().unwrap();
        for name in [
            pod_name(longest.as_str()),
            pvc_name(longest.as_str()),
            secret_name(longest.as_str()),
        ] {
            assert!(name.len() <= 63, "{name} is {} long", name.len());
        }
    }

    #[test]
    fn names() {
        assert_eq!(pod_name("support"), "wa-support");
        assert_eq!(pvc_name("support"), "wa-support-auth");
        assert_eq!(secret_name("support"), "wa-support-token");
    }
}
