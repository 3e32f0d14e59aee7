//! Label selectors (`=`, `==`, `!=`, `in`, `notin`, exists, `!`, `>`, `<`) and field selectors
//! (`=`, `==`, `!=` on the fields each kind supports), parsed as the API server parses them.

use std::collections::BTreeSet;

use serde_json::Value;

use super::catalog::BuiltinKind;

#[derive(Debug, Clone, PartialEq)]
enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
    Exists(String),
    DoesNotExist(String),
    GreaterThan(String, i64),
    LessThan(String, i64),
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LabelSelector(Vec<LabelRequirement>);

/// Splits at commas outside parentheses.
fn split_top_level(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

fn valid_label_key(key: &str) -> bool {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix
        && (p.is_empty() || p.len() > 253 || !p.split('.').all(valid_dns_label)) {
            return false;
        }
    valid_label_value(name) && !name.is_empty()
}

fn valid_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Label values: at most 63 characters, alphanumerics with `-_.` inside.
pub fn valid_label_value(v: &str) -> bool {
    v.is_empty()
        || (v.len() <= 63
            && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && v.as_bytes()[0].is_ascii_alphanumeric()
            && v.as_bytes()[v.len() - 1].is_ascii_alphanumeric())
}

/// Label keys: an optional DNS-subdomain prefix and a name.
pub fn valid_label_name(key: &str) -> bool {
    valid_label_key(key)
}

impl LabelSelector {
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(Self::default());
        }
        let mut reqs = Vec::new();
        for part in split_top_level(text) {
            reqs.push(parse_requirement(part.trim()).map_err(|e| format!("unable to parse requirement: {e}"))?);
        }
        Ok(Self(reqs))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn matches(&self, labels: Option<&serde_json::Map<String, Value>>) -> bool {
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|req| match req {
            LabelRequirement::Equals(k, v) => get(k) == Some(v.as_str()),
            LabelRequirement::NotEquals(k, v) => get(k) != Some(v.as_str()),
            LabelRequirement::In(k, vs) => get(k).is_some_and(|x| vs.contains(x)),
            LabelRequirement::NotIn(k, vs) => !get(k).is_some_and(|x| vs.contains(x)),
            LabelRequirement::Exists(k) => get(k).is_some(),
            LabelRequirement::DoesNotExist(k) => get(k).is_none(),
            LabelRequirement::GreaterThan(k, n) => get(k).and_then(|x| x.parse::<i64>().ok()).is_some_and(|x| x > *n),
            LabelRequirement::LessThan(k, n) => get(k).and_then(|x| x.parse::<i64>().ok()).is_some_and(|x| x < *n),
        })
    }
}

fn parse_set(rest: &str) -> Result<BTreeSet<String>, String> {
    let inner = rest
        .trim()
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| format!("expected a parenthesised list, found {rest:?}"))?;
    let mut values = BTreeSet::new();
    for v in inner.split(',') {
        let v = v.trim();
        if !valid_label_value(v) {
            return Err(format!("invalid label value: {v:?}"));
        }
        values.insert(v.to_owned());
    }
    Ok(values)
}

fn checked_key(key: &str) -> Result<String, String> {
    let key = key.trim();
    if valid_label_key(key) {
        Ok(key.to_owned())
    } else {
        Err(format!("invalid label key {key:?}"))
    }
}

fn checked_value(value: &str) -> Result<String, String> {
    let value = value.trim();
    if valid_label_value(value) {
        Ok(value.to_owned())
    } else {
        Err(format!("invalid label value: {value:?}"))
    }
}

fn parse_requirement(part: &str) -> Result<LabelRequirement, String> {
    if part.is_empty() {
        return Err("found '', expected: identifier".into());
    }
    if let Some(key) = part.strip_prefix('!') {
        return Ok(LabelRequirement::DoesNotExist(checked_key(key)?));
    }
    // Set-based: `key in (a,b)`, `key notin (a,b)`.
    let words: Vec<&str> = part.splitn(2, char::is_whitespace).collect();
    if words.len() == 2 {
        let rest = words[1].trim_start();
        if let Some(set) = rest.strip_prefix("notin") {
            return Ok(LabelRequirement::NotIn(checked_key(words[0])?, parse_set(set)?));
        }
        if let Some(set) = rest.strip_prefix("in")
            && set.trim_start().starts_with('(') {
                return Ok(LabelRequirement::In(checked_key(words[0])?, parse_set(set)?));
            }
    }
    for (op, build) in [
        ("!=", LabelRequirement::NotEquals as fn(String, String) -> LabelRequirement),
        ("==", LabelRequirement::Equals),
        ("=", LabelRequirement::Equals),
    ] {
        if let Some((k, v)) = part.split_once(op) {
            return Ok(build(checked_key(k)?, checked_value(v)?));
        }
    }
    for (op, greater) in [(">", true), ("<", false)] {
        if let Some((k, v)) = part.split_once(op) {
            let n: i64 = v.trim().parse().map_err(|_| format!("for '{op}' operator, the value must be an integer"))?;
            let k = checked_key(k)?;
            return Ok(if greater {
                LabelRequirement::GreaterThan(k, n)
            } else {
                LabelRequirement::LessThan(k, n)
            });
        }
    }
    Ok(LabelRequirement::Exists(checked_key(part)?))
}

/// A parsed field selector.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FieldSelector(Vec<(String, bool, String)>);

/// Field selectors each kind supports besides `metadata.name` and `metadata.namespace`.
fn supported_fields(kind: Option<BuiltinKind>) -> &'static [&'static str] {
    match kind {
        Some(BuiltinKind::Pod) => &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ],
        Some(BuiltinKind::Secret) => &["type"],
        Some(BuiltinKind::Namespace) => &["status.phase"],
        Some(BuiltinKind::Node) => &["spec.unschedulable"],
        Some(BuiltinKind::PersistentVolumeClaim) => &[],
        Some(BuiltinKind::Event | BuiltinKind::EventV1) => &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
            "regarding.kind",
            "regarding.namespace",
            "regarding.name",
            "regarding.uid",
            "reportingController",
        ],
        _ => &[],
    }
}

fn unescape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(next) = chars.next() {
                out.push(next);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Splits at unescaped commas.
fn split_unescaped(s: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut escaped = false;
    for c in s.chars() {
        if escaped {
            cur.push('\\');
            cur.push(c);
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == ',' {
            parts.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    parts
}

impl FieldSelector {
    pub fn parse(text: &str, kind: Option<BuiltinKind>) -> Result<Self, String> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(Self::default());
        }
        let mut reqs = Vec::new();
        for part in split_unescaped(text) {
            let part = part.trim();
            let (field, equal, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, true, v)
            } else {
                return Err(format!("invalid selector: '{part}'; can't understand '{part}'"));
            };
            let field = field.trim();
            let supported = matches!(field, "metadata.name" | "metadata.namespace") || supported_fields(kind).contains(&field);
            if !supported {
                return Err(format!("field label not supported: {field}"));
            }
            reqs.push((field.to_owned(), equal, unescape(value.trim())));
        }
        Ok(Self(reqs))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `metadata.name=x` alone: lets a list or watch look at one object only.
    pub fn single_name(&self) -> Option<&str> {
        match self.0.as_slice() {
            [(field, true, name)] if field == "metadata.name" => Some(name),
            _ => None,
        }
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(field, equal, value)| {
            let actual = field_value(obj, field);
            (actual == *value) == *equal
        })
    }
}

/// A field as a string, empty when absent (how field selectors see missing fields).
fn field_value(obj: &Value, field: &str) -> String {
    let mut cur = obj;
    for part in field.split('.') {
        match cur.get(part) {
            Some(next) => cur = next,
            None => {
                // events.k8s.io/v1 names some core fields differently.
                return match field {
                    f if f.starts_with("regarding.") => field_value(obj, &f.replacen("regarding.", "involvedObject.", 1)),
                    "reportingController" => field_value(obj, "reportingComponent"),
                    _ => String::new(),
                };
            }
        }
    }
    match cur {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        Value::Object(map) if field == "source" => map.get("component").and_then(Value::as_str).unwrap_or("").to_owned(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_selector_cases() {
        let labels = json!({"app": "wa", "tier": "session", "n": "5", "wa-operator.dev/session": "a"});
        let labels = labels.as_object();
        let cases = [
            ("", true),
            ("app=wa", true),
            ("app==wa", true),
            ("app!=wa", false),
            ("app=other", false),
            ("tier in (session, gateway)", true),
            ("tier in (gateway)", false),
            ("tier notin (gateway)", true),
            ("tier notin (session)", false),
            ("missing notin (x)", true),
            ("app", true),
            ("!app", false),
            ("!missing", true),
            ("n>4", true),
            ("n<5", false),
            ("app=wa,tier=session", true),
            ("app=wa, tier in (a,b)", false),
            ("wa-operator.dev/session=a", true),
        ];
        for (sel, expected) in cases {
            let parsed = LabelSelector::parse(sel).unwrap_or_else(|e| panic!("{sel}: {e}"));
            assert_eq!(parsed.matches(labels), expected, "{sel}");
        }
        assert!(!LabelSelector::parse("app=wa").unwrap().matches(None));
    }

    #[test]
    fn bad_label_selectors_are_refused() {
        for sel in ["app=", "=x", "a b c", "app in x", "app=@", "n>x", "Bad/Key=1"] {
            let result = LabelSelector::parse(sel);
            if sel == "app=" {
                // An empty value is valid: it matches labels set to "".
                assert!(result.is_ok());
                continue;
            }
            assert!(result.is_err(), "{sel} should be refused");
        }
    }

    #[test]
    fn field_selector_cases() {
        let pod = json!({"metadata": {"name": "wa-a", "namespace": "ns"}, "spec": {"nodeName": "n1"}, "status": {"phase": "Running"}});
        let cases = [
            ("metadata.name=wa-a", true),
            ("metadata.name==wa-a", true),
            ("metadata.name!=wa-a", false),
            ("metadata.namespace=ns,status.phase=Running", true),
            ("spec.nodeName=", false),
            ("status.podIP=", true),
        ];
        for (sel, expected) in cases {
            let parsed = FieldSelector::parse(sel, Some(BuiltinKind::Pod)).unwrap();
            assert_eq!(parsed.matches(&pod), expected, "{sel}");
        }
        assert_eq!(FieldSelector::parse("metadata.name=x", None).unwrap().single_name(), Some("x"));
        let err = FieldSelector::parse("spec.engine=sandbox", None).unwrap_err();
        assert_eq!(err, "field label not supported: spec.engine");
        assert!(FieldSelector::parse("nonsense", None).is_err());
    }

    #[test]
    fn event_fields_work_in_both_apis() {
        let ev = json!({"involvedObject": {"name": "wa-a", "kind": "Pod"}, "reason": "Started", "source": {"component": "kubelet"}});
        let sel = FieldSelector::parse("regarding.name=wa-a,involvedObject.kind=Pod,source=kubelet", Some(BuiltinKind::EventV1)).unwrap();
        assert!(sel.matches(&ev));
    }
}
