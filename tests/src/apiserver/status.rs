//! Failures as the Kubernetes API reports them: a `metav1.Status` body with an HTTP code and a
//! stable `reason` (`NotFound`, `AlreadyExists`, `Conflict`, `Invalid`, `Gone`, …).
//!
//! Clients branch on `reason` and `code` (kube-rs's `ErrorResponse`, kubectl's
//! `apierrors.IsNotFound`), so these follow the real API server's wording and codes.

use serde_json::{Value, json};

/// One failed API call.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

/// One field-level cause of an `Invalid` answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Cause {
    /// `FieldValueInvalid`, `FieldValueRequired`, `FieldValueNotSupported`, …
    pub reason: &'static str,
    /// `spec.phoneNumber`.
    pub field: String,
    /// `Invalid value: "555": spec.phoneNumber in body should match '…'`.
    pub message: String,
}

impl Cause {
    pub fn new(reason: &'static str, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            reason,
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The resource an error is about, as the server names it in messages:
/// `pods`, `whatsappsessions.wa-operator.dev`.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub group: &'a str,
    pub resource: &'a str,
    pub kind: &'a str,
}

impl Subject<'_> {
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.resource.to_owned()
        } else {
            format!("{}.{}", self.resource, self.group)
        }
    }

    fn qualified_kind(&self) -> String {
        if self.group.is_empty() {
            self.kind.to_owned()
        } else {
            format!("{}.{}", self.kind, self.group)
        }
    }
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub fn not_found(subject: Subject<'_>, name: &str) -> Self {
        Self::new(404, "NotFound", format!("{} \"{name}\" not found", subject.qualified()))
            .with_details(json!({"name": name, "group": subject.group, "kind": subject.resource}))
    }

    /// A namespaced object asked for in a namespace that does not exist.
    pub fn namespace_not_found(namespace: &str) -> Self {
        Self::new(404, "NotFound", format!("namespaces \"{namespace}\" not found"))
            .with_details(json!({"name": namespace, "kind": "namespaces"}))
    }

    /// A path that names no resource.
    pub fn no_route() -> Self {
        Self::new(404, "NotFound", "the server could not find the requested resource")
            .with_details(json!({"causes": [{"reason": "UnexpectedServerResponse", "message": "404 page not found"}]}))
    }

    pub fn already_exists(subject: Subject<'_>, name: &str) -> Self {
        Self::new(409, "AlreadyExists", format!("{} \"{name}\" already exists", subject.qualified()))
            .with_details(json!({"name": name, "group": subject.group, "kind": subject.resource}))
    }

    /// Optimistic concurrency: the caller's resourceVersion (or uid precondition) is stale.
    pub fn conflict(subject: Subject<'_>, name: &str, why: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!("Operation cannot be fulfilled on {} \"{name}\": {why}", subject.qualified()),
        )
        .with_details(json!({"name": name, "group": subject.group, "kind": subject.resource}))
    }

    pub fn modified(subject: Subject<'_>, name: &str) -> Self {
        Self::conflict(
            subject,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    /// Server-side apply found fields another manager owns with a different value.
    pub fn apply_conflict(subject: Subject<'_>, name: &str, conflicts: &[(String, String)]) -> Self {
        let lines: Vec<String> = conflicts
            .iter()
            .map(|(manager, field)| format!("conflict with \"{manager}\": {field}"))
            .collect();
        let message = if lines.len() == 1 {
            format!("Apply failed with 1 conflict: {}", lines[0])
        } else {
            format!("Apply failed with {} conflicts: {}", lines.len(), lines.join("\n"))
        };
        let causes: Vec<Value> = conflicts
            .iter()
            .map(|(manager, field)| {
                json!({"reason": "FieldManagerConflict", "message": format!("conflict with \"{manager}\""), "field": field})
            })
            .collect();
        Self::new(409, "Conflict", message).with_details(
            json!({"name": name, "group": subject.group, "kind": subject.resource, "causes": causes}),
        )
    }

    /// 422 with field causes, worded like the API server's validation errors.
    pub fn invalid(subject: Subject<'_>, name: &str, causes: Vec<Cause>) -> Self {
        let summary: Vec<String> = causes.iter().map(|c| format!("{}: {}", c.field, c.message)).collect();
        let summary = if summary.len() == 1 {
            summary[0].clone()
        } else {
            format!("[{}]", summary.join(", "))
        };
        let json_causes: Vec<Value> = causes
            .iter()
            .map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field}))
            .collect();
        Self::new(
            422,
            "Invalid",
            format!("{} \"{name}\" is invalid: {summary}", subject.qualified_kind()),
        )
        .with_details(json!({"name": name, "group": subject.group, "kind": subject.kind, "causes": json_causes}))
    }

    pub fn forbidden(subject: Subject<'_>, name: &str, why: impl std::fmt::Display) -> Self {
        Self::new(
            403,
            "Forbidden",
            format!("{} \"{name}\" is forbidden: {why}", subject.qualified()),
        )
        .with_details(json!({"name": name, "group": subject.group, "kind": subject.resource}))
    }

    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(405, "MethodNotAllowed", message)
    }

    pub fn not_acceptable(message: impl Into<String>) -> Self {
        Self::new(406, "NotAcceptable", message)
    }

    /// A watch or list asked for a resourceVersion the history no longer holds.
    pub fn gone(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    pub fn too_large(limit: usize) -> Self {
        Self::new(413, "RequestEntityTooLarge", format!("request is too large: the limit is {limit} bytes"))
    }

    pub fn unsupported_media_type(content_type: &str, accepted: &[&str]) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format ({content_type:?}) - accepted media types include: {}",
                accepted.join(", ")
            ),
        )
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "InternalError", message)
    }

    /// The `metav1.Status` body.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.code, self.reason, self.message)
    }
}

impl std::error::Error for ApiError {}

/// `{"kind":"Status","status":"Success"}`, the answer to deleting an object that is gone now.
pub fn success(subject: Subject<'_>, name: &str, uid: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": {"name": name, "group": subject.group, "kind": subject.resource, "uid": uid},
    })
}

pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    const SESSIONS: Subject<'static> = Subject {
        group: "wa-operator.dev",
        resource: "whatsappsessions",
        kind: "WhatsAppSession",
    };
    const PODS: Subject<'static> = Subject {
        group: "",
        resource: "pods",
        kind: "Pod",
    };

    #[test]
    fn messages_read_like_the_api_server() {
        let cases = [
            (ApiError::not_found(PODS, "wa-a"), 404, "NotFound", "pods \"wa-a\" not found"),
            (
                ApiError::not_found(SESSIONS, "a"),
                404,
                "NotFound",
                "whatsappsessions.wa-operator.dev \"a\" not found",
            ),
            (
                ApiError::already_exists(PODS, "wa-a"),
                409,
                "AlreadyExists",
                "pods \"wa-a\" already exists",
            ),
            (
                ApiError::modified(SESSIONS, "a"),
                409,
                "Conflict",
                "Operation cannot be fulfilled on whatsappsessions.wa-operator.dev \"a\": the object has been modified; please apply your changes to the latest version and try again",
            ),
            (
                ApiError::invalid(
                    SESSIONS,
                    "a",
                    vec![Cause::new("FieldValueRequired", "spec.url", "Required value")],
                ),
                422,
                "Invalid",
                "WhatsAppSession.wa-operator.dev \"a\" is invalid: spec.url: Required value",
            ),
        ];
        for (err, code, reason, message) in cases {
            assert_eq!((err.code, err.reason, err.message.as_str()), (code, reason, message));
            let status = err.to_status();
            assert_eq!(status["kind"], "Status");
            assert_eq!(status["status"], "Failure");
            assert_eq!(status["code"], code);
        }
    }

    #[test]
    fn apply_conflicts_list_every_field() {
        let err = ApiError::apply_conflict(
            SESSIONS,
            "a",
            &[("kubectl".into(), ".spec.engine".into()), ("op".into(), ".spec.suspend".into())],
        );
        assert_eq!(err.code, 409);
        assert!(err.message.starts_with("Apply failed with 2 conflicts"), "{}", err.message);
        let causes = err.details.unwrap()["causes"].as_array().unwrap().len();
        assert_eq!(causes, 2);
    }
}
