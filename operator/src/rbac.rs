//! Every Kubernetes API verb the operator uses, kept next to the code that uses it.
//!
//! The Helm chart's (Cluster)Role is generated from [`RULES`] (`wa-operator rbac` prints
//! it) so it stays least-privilege. The reconcile tests check that every request the
//! reconciler makes is allowed here, and that every verb here is used by a test scenario
//! or by the controller's watches.

use std::fmt::Write as _;

/// One RBAC rule: API group, resource, verbs, and why the operator needs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub api_group: &'static str,
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
    pub why: &'static str,
}

pub const RULES: &[Rule] = &[
    Rule {
        api_group: "wa-operator.dev",
        resource: "whatsappsessions",
        verbs: &["list", "watch", "patch"],
        why: "the controller watches sessions; patch adds and removes the finalizer",
    },
    Rule {
        api_group: "wa-operator.dev",
        resource: "whatsappsessions/status",
        verbs: &["patch"],
        why: "status is written with server-side apply",
    },
    Rule {
        api_group: "wa-operator.dev",
        resource: "whatsappsessions/finalizers",
        verbs: &["update"],
        why: "children carry blockOwnerDeletion owner references; clusters with OwnerReferencesPermissionEnforcement require this (no request uses it)",
    },
    Rule {
        api_group: "",
        resource: "pods",
        verbs: &["get", "list", "watch", "create", "patch", "delete"],
        why: "session pods: watched (owned), created by server-side apply (patch; create when new), deleted to roll, suspend and clean up",
    },
    Rule {
        api_group: "",
        resource: "persistentvolumeclaims",
        verbs: &["get", "create", "patch", "delete"],
        why: "auth volumes: server-side apply (patch; create when new); deleted on session deletion unless retained",
    },
    Rule {
        api_group: "",
        resource: "secrets",
        verbs: &["get", "create", "patch", "delete"],
        why: "pod token: created once, read to call the pod, adopted or repaired by apply, deleted with the session; never listed or watched",
    },
    Rule {
        api_group: "events.k8s.io",
        resource: "events",
        verbs: &["create", "patch"],
        why: "Kubernetes Events on sessions (kube's Recorder; patch updates a repeated event's series)",
    },
    Rule {
        api_group: "coordination.k8s.io",
        resource: "leases",
        verbs: &["get", "create", "update"],
        why: "leader election",
    },
];

/// Verbs only the controller's watches use (not made by reconcile code).
pub const WATCH_VERBS: &[&str] = &["list", "watch"];

/// Permissions no request of the operator uses, checked by API server admission on its
/// behalf: setting `blockOwnerDeletion` on an owner reference needs `update` on the owner's
/// `finalizers` subresource (OwnerReferencesPermissionEnforcement, on by default in
/// OpenShift and in many hardened clusters).
pub const ADMISSION_ONLY: &[(&str, &str, &str)] =
    &[("wa-operator.dev", "whatsappsessions/finalizers", "update")];

/// Whether `verb` on `group`/`resource` is in [`RULES`].
pub fn allows(api_group: &str, resource: &str, verb: &str) -> bool {
    RULES
        .iter()
        .any(|r| r.api_group == api_group && r.resource == resource && r.verbs.contains(&verb))
}

/// The rules as the YAML list of a ClusterRole's (or Role's) `rules:`.
pub fn rules_yaml() -> String {
    let mut out = String::new();
    for r in RULES {
        let _ = writeln!(out, "# {}", r.why);
        let _ = writeln!(out, "- apiGroups: [\"{}\"]", r.api_group);
        let _ = writeln!(out, "  resources: [\"{}\"]", r.resource);
        let verbs: Vec<String> = r.verbs.iter().map(|v| format!("\"{v}\"")).collect();
        let _ = writeln!(out, "  verbs: [{}]", verbs.join(", "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_is_valid_and_matches_the_rules() {
        let parsed: Vec<serde_json::Value> = serde_yaml::from_str(&rules_yaml()).unwrap();
        assert_eq!(parsed.len(), RULES.len());
        for (p, r) in parsed.iter().zip(RULES) {
            assert_eq!(p["apiGroups"][0], r.api_group);
            assert_eq!(p["resources"][0], r.resource);
            let verbs: Vec<&str> = p["verbs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            assert_eq!(verbs, r.verbs);
        }
    }

    #[test]
    fn admission_only_permissions_are_granted() {
        for (group, resource, verb) in ADMISSION_ONLY {
            assert!(allows(group, resource, verb), "{verb} {group}/{resource}");
        }
    }

    #[test]
    fn least_privilege_shape() {
        // The operator never needs to read every Secret in a namespace.
        assert!(!allows("", "secrets", "list") && !allows("", "secrets", "watch"));
        // No wildcards, no escalation verbs.
        for r in RULES {
            for v in r.verbs {
                assert!(
                    !["*", "escalate", "bind", "impersonate", "deletecollection"].contains(v),
                    "{v}"
                );
            }
            assert_ne!(r.resource, "*");
        }
    }
}
