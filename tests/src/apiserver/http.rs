//! The HTTP face of the emulator: Kubernetes REST paths, query parameters, content
//! negotiation (JSON, Table, PartialObjectMetadata), list pagination and watch streams.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State as AxumState;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::apply::Scope;
use super::catalog::{BuiltinKind, ResourceType};
use super::discovery;
use super::patch::PatchKind;
use super::registry::{self, DeleteOptions, DeleteOutcome, FieldValidation, Propagation, State, WriteOptions, Written};
use super::selector::{FieldSelector, LabelSelector};
use super::status::{self, ApiError, ApiResult};
use super::store::{EventType, StoredEvent};
use super::table::{self, IncludeObject};

/// Largest request body accepted, like the API server's limit.
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;

/// State shared by every request.
pub struct Shared {
    pub state: Arc<Mutex<State>>,
    pub changes: watch::Receiver<u64>,
    pub server_address: String,
    pub bookmark_interval: Duration,
    pub pod_log_dir: Option<PathBuf>,
    pub shutdown: CancellationToken,
    pages: Mutex<HashMap<String, Page>>,
}

/// The rest of a paginated list, kept so that every page comes from one snapshot.
struct Page {
    items: Arc<Vec<Arc<Value>>>,
    offset: usize,
    rv: u64,
    created: Instant,
}

const PAGE_TTL: Duration = Duration::from_secs(300);
const MAX_PAGES: usize = 256;

impl Shared {
    pub fn new(
        state: Arc<Mutex<State>>,
        changes: watch::Receiver<u64>,
        server_address: String,
        bookmark_interval: Duration,
        pod_log_dir: Option<PathBuf>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            state,
            changes,
            server_address,
            bookmark_interval,
            pod_log_dir,
            shutdown,
            pages: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Every request comes here; paths are parsed by hand because Kubernetes' URL grammar is
/// contextual (`namespaces/{ns}/status` vs `namespaces/{ns}/pods`).
pub async fn serve(AxumState(shared): AxumState<Arc<Shared>>, method: Method, uri: Uri, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let path = uri.path().to_owned();
    let response = match route(&shared, &method, &uri, &headers, body).await {
        Ok(response) => response,
        Err(err) => error_response(&err),
    };
    tracing::debug!(%method, %path, status = response.status().as_u16(), elapsed_ms = started.elapsed().as_millis() as u64, "api request");
    response
}

fn error_response(err: &ApiError) -> Response {
    let code = StatusCode::from_u16(err.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(code, &err.to_status(), &[])
}

fn json_response(code: StatusCode, body: &Value, warnings: &[String]) -> Response {
    let mut response = (code, body.to_string()).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    for warning in warnings {
        let text = format!("299 - \"{}\"", warning.replace('"', "\\\""));
        if let Ok(value) = HeaderValue::from_str(&text) {
            headers.append("warning", value);
        }
    }
    response
}

type Query = HashMap<String, String>;

fn parse_query(uri: &Uri) -> Query {
    form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn flag(query: &Query, name: &str) -> bool {
    matches!(query.get(name).map(String::as_str), Some("true" | "1"))
}

fn segments(uri: &Uri) -> Vec<String> {
    uri.path()
        .split('/')
        .filter(|s| !s.is_empty())
        .map(percent_decode)
        .collect()
}

fn percent_decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn read_body(body: Body) -> ApiResult<Bytes> {
    axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| ApiError::too_large(MAX_BODY_BYTES))
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_owned()
}

/// Decodes a JSON or YAML body.
fn decode_body(bytes: &Bytes, content_type: &str) -> ApiResult<Value> {
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if bytes.is_empty() {
        return Err(ApiError::bad_request("the request body is empty"));
    }
    if essence == "application/vnd.kubernetes.protobuf" {
        return super::protobuf::decode(bytes).map_err(|why| {
            let mut err = ApiError::unsupported_media_type(&essence, &["application/json", "application/yaml"]);
            err.message = format!("{} ({why})", err.message);
            err
        });
    }
    let yaml = essence.contains("yaml");
    if !yaml && !essence.contains("json") && !essence.is_empty() {
        return Err(ApiError::unsupported_media_type(&essence, &["application/json", "application/yaml"]));
    }
    match serde_json::from_slice::<Value>(bytes) {
        Ok(v) => Ok(v),
        Err(json_err) if yaml => serde_yaml::from_slice::<Value>(bytes)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e} (as JSON: {json_err})"))),
        Err(e) => Err(ApiError::bad_request(format!("error decoding JSON: {e}"))),
    }
}

/// What the client wants back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Output {
    Json,
    Table(IncludeObject),
    Metadata,
}

fn negotiate(headers: &HeaderMap, query: &Query) -> ApiResult<Output> {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("");
    if accept.trim().is_empty() {
        return Ok(Output::Json);
    }
    for range in accept.split(',') {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("").to_ascii_lowercase();
        let params: HashMap<String, String> = parts
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        let json_like = matches!(media.as_str(), "application/json" | "application/*" | "*/*" | "application/yaml");
        if !json_like {
            continue;
        }
        match params.get("as").map(String::as_str) {
            None => return Ok(Output::Json),
            Some("Table") if params.get("g").map(String::as_str) == Some("meta.k8s.io") => {
                return Ok(Output::Table(IncludeObject::parse(query.get("includeObject").map(String::as_str))));
            }
            Some("PartialObjectMetadata" | "PartialObjectMetadataList")
                if params.get("g").map(String::as_str) == Some("meta.k8s.io") =>
            {
                return Ok(Output::Metadata);
            }
            Some(_) => continue,
        }
    }
    Err(ApiError::not_acceptable(format!(
        "only the following media types are accepted: application/json, application/yaml (asked for {accept:?})"
    )))
}

/// `/openapi/v2` without definitions: clients that validate against it (kubectl before 1.27)
/// find no schema for any kind and leave validation to the server, which does it.
fn openapi_v2(headers: &HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("");
    if accept.contains("protobuf") {
        // An empty protobuf message is a valid, empty OpenAPI v2 document.
        let mut response = (StatusCode::OK, Vec::<u8>::new()).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        return response;
    }
    let doc = json!({"swagger": "2.0", "info": {"title": "Kubernetes", "version": format!("v1.{}.0", discovery::KUBERNETES_MINOR)},
        "paths": {}, "definitions": {}});
    json_response(StatusCode::OK, &doc, &[])
}

/// Where a request points inside one resource type.
struct Target {
    rt: ResourceType,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
    watch_path: bool,
}

async fn route(shared: &Arc<Shared>, method: &Method, uri: &Uri, headers: &HeaderMap, body: Body) -> ApiResult<Response> {
    let segs = segments(uri);
    let parts: Vec<&str> = segs.iter().map(String::as_str).collect();
    let get_only = |doc: Option<Value>| -> ApiResult<Response> {
        if method != Method::GET {
            return Err(ApiError::method_not_allowed(format!("{method} is not supported here")));
        }
        doc.map(|d| json_response(StatusCode::OK, &d, &[])).ok_or_else(ApiError::no_route)
    };
    match parts.as_slice() {
        ["version"] => get_only(Some(discovery::version())),
        ["healthz" | "livez" | "readyz"] => Ok((StatusCode::OK, "ok").into_response()),
        ["api"] => get_only(Some(discovery::api_versions(&shared.server_address))),
        ["apis"] => get_only(Some(discovery::api_group_list(&shared.lock().catalog))),
        ["openapi", "v2"] => Ok(openapi_v2(headers)),
        ["openapi", "v3"] => get_only(Some(discovery::openapi_index(&shared.lock().catalog))),
        ["openapi", "v3", "api", version] => get_only(Some(discovery::openapi_document(&shared.lock().catalog, "", version))),
        ["openapi", "v3", "apis", group, version] => {
            get_only(Some(discovery::openapi_document(&shared.lock().catalog, group, version)))
        }
        ["api", version] => get_only(discovery::api_resource_list(&shared.lock().catalog, "", version)),
        ["apis", group] => get_only(discovery::api_group(&shared.lock().catalog, group)),
        ["apis", group, version] => get_only(discovery::api_resource_list(&shared.lock().catalog, group, version)),
        ["api", version, rest @ ..] => {
            let target = resolve(shared, "", version, rest)?;
            resource_request(shared, method, uri, headers, body, target).await
        }
        ["apis", group, version, rest @ ..] => {
            let target = resolve(shared, group, version, rest)?;
            resource_request(shared, method, uri, headers, body, target).await
        }
        _ => Err(ApiError::no_route()),
    }
}

fn resolve(shared: &Shared, group: &str, version: &str, rest: &[&str]) -> ApiResult<Target> {
    let (watch_path, rest) = match rest {
        ["watch", tail @ ..] => (true, tail),
        _ => (false, rest),
    };
    let (namespace, resource, name, subresource) = match rest {
        ["namespaces", ns, sub @ ("status" | "finalize")] if group.is_empty() => {
            (None, "namespaces", Some(*ns), Some(*sub))
        }
        ["namespaces", ns, resource] => (Some(*ns), *resource, None, None),
        ["namespaces", ns, resource, name] => (Some(*ns), *resource, Some(*name), None),
        ["namespaces", ns, resource, name, sub] => (Some(*ns), *resource, Some(*name), Some(*sub)),
        [resource] => (None, *resource, None, None),
        [resource, name] => (None, *resource, Some(*name), None),
        [resource, name, sub] => (None, *resource, Some(*name), Some(*sub)),
        _ => return Err(ApiError::no_route()),
    };
    let rt = shared
        .lock()
        .catalog
        .find(group, version, resource)
        .cloned()
        .ok_or_else(ApiError::no_route)?;
    if namespace.is_some() && !rt.namespaced {
        return Err(ApiError::no_route());
    }
    if rt.namespaced && namespace.is_none() && name.is_some() {
        return Err(ApiError::no_route());
    }
    if let Some(sub) = subresource
        && !rt.subresources().iter().any(|(s, _)| *s == sub) {
            return Err(ApiError::no_route());
        }
    Ok(Target {
        rt,
        namespace: namespace.map(str::to_owned),
        name: name.map(str::to_owned),
        subresource: subresource.map(str::to_owned),
        watch_path,
    })
}

fn write_options(query: &Query, headers: &HeaderMap) -> ApiResult<WriteOptions> {
    let manager = match query.get("fieldManager").filter(|m| !m.is_empty()) {
        Some(m) => {
            if m.len() > 128 {
                return Err(ApiError::bad_request("fieldManager must be at most 128 characters"));
            }
            m.clone()
        }
        None => headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .and_then(|ua| ua.split('/').next())
            .filter(|p| !p.is_empty())
            .unwrap_or("unknown")
            .to_owned(),
    };
    let dry_run = match query.get("dryRun").map(String::as_str) {
        None | Some("") => false,
        Some("All") => true,
        Some(other) => return Err(ApiError::bad_request(format!("unsupported dryRun value {other:?}: only \"All\" is supported"))),
    };
    Ok(WriteOptions {
        dry_run,
        field_manager: manager,
        field_validation: FieldValidation::parse(query.get("fieldValidation").map(String::as_str))?,
        force: flag(query, "force"),
    })
}

async fn resource_request(shared: &Arc<Shared>, method: &Method, uri: &Uri, headers: &HeaderMap, body: Body, target: Target) -> ApiResult<Response> {
    let query = parse_query(uri);
    let ns = target.namespace.clone().unwrap_or_default();
    let rt = &target.rt;
    let sub = target.subresource.as_deref();
    let name = target.name.clone();
    let is_watch = target.watch_path || flag(&query, "watch");
    match (method.clone(), name, sub) {
        (Method::GET, None, None) if is_watch => watch(shared, &target, &query, headers, None),
        (Method::GET, Some(n), None) if is_watch => watch(shared, &target, &query, headers, Some(n)),
        (Method::GET, None, None) => list(shared, &target, &query, headers),
        (Method::GET, Some(n), None | Some("status")) => {
            let output = negotiate(headers, &query)?;
            let obj = registry::get(&shared.lock(), rt, &ns, &n)?;
            Ok(render_one(rt, &obj, output, StatusCode::OK, &[]))
        }
        (Method::GET, Some(n), Some("log")) => pod_log(shared, &ns, &n, &query),
        (Method::GET, Some(n), Some("scale")) => {
            let scale = registry::get_scale(&shared.lock(), rt, &ns, &n)?;
            Ok(json_response(StatusCode::OK, &scale, &[]))
        }
        (Method::PUT, Some(n), Some("scale")) => {
            let opts = write_options(&query, headers)?;
            let body = decode_body(&read_body(body).await?, &content_type(headers))?;
            let scale = registry::set_scale(&mut shared.lock(), rt, &ns, &n, &body, &opts)?;
            Ok(json_response(StatusCode::OK, &scale, &[]))
        }
        (Method::PATCH, Some(n), Some("scale")) => {
            let content_type = content_type(headers);
            let kind = match PatchKind::from_content_type(&content_type) {
                Some(kind @ (PatchKind::Merge | PatchKind::Json | PatchKind::Strategic)) => kind,
                _ => {
                    let accepted = &["application/json-patch+json", "application/merge-patch+json", "application/strategic-merge-patch+json"];
                    return Err(ApiError::unsupported_media_type(&content_type, accepted));
                }
            };
            let opts = write_options(&query, headers)?;
            let patch = decode_body(&read_body(body).await?, "application/json")?;
            let mut state = shared.lock();
            let mut scale = registry::get_scale(&state, rt, &ns, &n)?;
            let applied = match kind {
                PatchKind::Merge => crate::apiserver::patch::merge_patch(&mut scale, &patch),
                PatchKind::Json => crate::apiserver::patch::json_patch(&mut scale, &patch),
                _ => crate::apiserver::patch::strategic_merge(&mut scale, &patch, &registry::semantics(rt).field("scale")),
            };
            applied.map_err(|e| match e {
                crate::apiserver::patch::PatchError::Malformed(m) | crate::apiserver::patch::PatchError::NotApplicable(m) => ApiError::bad_request(m),
            })?;
            let scale = registry::set_scale(&mut state, rt, &ns, &n, &scale, &opts)?;
            Ok(json_response(StatusCode::OK, &scale, &[]))
        }
        (Method::POST, None, None) => {
            if rt.namespaced && target.namespace.is_none() {
                return Err(ApiError::method_not_allowed("create needs a namespace in the path"));
            }
            let opts = write_options(&query, headers)?;
            let body = decode_body(&read_body(body).await?, &content_type(headers))?;
            let output = negotiate(headers, &query)?;
            let written = registry::create(&mut shared.lock(), rt, &ns, body, &opts, None)?;
            Ok(render_written(rt, written, output))
        }
        (Method::POST, Some(n), Some("binding")) => {
            let body = decode_body(&read_body(body).await?, &content_type(headers))?;
            registry::bind(&mut shared.lock(), rt, &ns, &n, &body)?;
            Ok(json_response(StatusCode::CREATED, &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}), &[]))
        }
        (Method::PUT, Some(n), None | Some("status")) => {
            let opts = write_options(&query, headers)?;
            let body = decode_body(&read_body(body).await?, &content_type(headers))?;
            let output = negotiate(headers, &query)?;
            let scope = scope_for(rt, sub);
            let written = registry::update(&mut shared.lock(), rt, &ns, &n, body, scope, &opts)?;
            Ok(render_written(rt, written, output))
        }
        (Method::PUT, Some(n), Some("finalize")) => {
            let body = decode_body(&read_body(body).await?, &content_type(headers))?;
            let written = registry::finalize_namespace(&mut shared.lock(), rt, &n, &body)?;
            Ok(render_written(rt, written, Output::Json))
        }
        (Method::PATCH, Some(n), None | Some("status")) => {
            let content_type = content_type(headers);
            let Some(kind) = PatchKind::from_content_type(&content_type) else {
                return Err(ApiError::unsupported_media_type(&content_type, PatchKind::ACCEPTED));
            };
            let opts = write_options(&query, headers)?;
            let bytes = read_body(body).await?;
            let body = decode_body(&bytes, if kind == PatchKind::Apply { "application/yaml" } else { "application/json" })?;
            let output = negotiate(headers, &query)?;
            let scope = scope_for(rt, sub);
            let written = registry::patch(&mut shared.lock(), rt, &ns, &n, kind, &body, scope, &opts)?;
            Ok(render_written(rt, written, output))
        }
        (Method::DELETE, Some(n), None) => {
            let del = delete_options(&query, &read_body(body).await?)?;
            let outcome = registry::delete(&mut shared.lock(), rt, &ns, &n, &del)?;
            Ok(render_deleted(rt, outcome))
        }
        (Method::DELETE, None, None) => delete_collection(shared, &target, &query, body).await,
        _ => Err(ApiError::method_not_allowed(format!(
            "the server does not allow this method on the requested resource ({method} {})",
            uri.path()
        ))),
    }
}

fn scope_for(rt: &ResourceType, sub: Option<&str>) -> Scope {
    match sub {
        Some("status") => Scope::Status,
        _ if rt.status_subresource => Scope::Main,
        _ => Scope::Whole,
    }
}

fn render_one(rt: &ResourceType, stored: &Value, output: Output, code: StatusCode, warnings: &[String]) -> Response {
    let obj = registry::to_output(rt, stored);
    let body = match output {
        Output::Json => obj,
        Output::Metadata => table::partial_metadata(&obj),
        Output::Table(include) => {
            let meta = json!({"resourceVersion": obj["metadata"]["resourceVersion"]});
            table::table(rt, &[&obj], include, meta, Utc::now())
        }
    };
    json_response(code, &body, warnings)
}

fn render_written(rt: &ResourceType, written: Written, output: Output) -> Response {
    let code = if written.created { StatusCode::CREATED } else { StatusCode::OK };
    render_one(rt, &written.object, output, code, &written.warnings)
}

/// Custom resources and pods answer a delete with the object; other kinds with a Status.
fn returns_deleted_object(rt: &ResourceType) -> bool {
    rt.custom().is_some() || matches!(rt.builtin(), Some(BuiltinKind::Pod | BuiltinKind::Namespace | BuiltinKind::CustomResourceDefinition))
}

fn render_deleted(rt: &ResourceType, outcome: DeleteOutcome) -> Response {
    match outcome {
        DeleteOutcome::Pending(obj) => json_response(StatusCode::OK, &registry::to_output(rt, &obj), &[]),
        DeleteOutcome::Gone(obj) if returns_deleted_object(rt) => {
            json_response(StatusCode::OK, &registry::to_output(rt, &obj), &[])
        }
        DeleteOutcome::Gone(obj) => {
            let name = obj["metadata"]["name"].as_str().unwrap_or("");
            let uid = obj["metadata"]["uid"].as_str().unwrap_or("");
            json_response(StatusCode::OK, &status::success(rt.subject(), name, uid), &[])
        }
    }
}

fn delete_options(query: &Query, body: &Bytes) -> ApiResult<DeleteOptions> {
    let doc: Value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("error decoding DeleteOptions: {e}")))?
    };
    let propagation = doc["propagationPolicy"]
        .as_str()
        .or(query.get("propagationPolicy").map(String::as_str))
        .map(|p| match p {
            "Orphan" => Ok(Propagation::Orphan),
            "Background" => Ok(Propagation::Background),
            "Foreground" => Ok(Propagation::Foreground),
            other => Err(ApiError::bad_request(format!(
                "propagationPolicy must be Orphan, Background or Foreground, not {other:?}"
            ))),
        })
        .transpose()?;
    let orphan = doc["orphanDependents"].as_bool().or_else(|| query.get("orphanDependents").map(|v| v == "true"));
    let propagation = match (propagation, orphan) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request("orphanDependents and propagationPolicy cannot both be set"));
        }
        (Some(p), None) => Some(p),
        (None, Some(true)) => Some(Propagation::Orphan),
        (None, Some(false)) => Some(Propagation::Background),
        (None, None) => None,
    };
    let grace_period = match doc["gracePeriodSeconds"].as_i64() {
        Some(g) => Some(g),
        None => query
            .get("gracePeriodSeconds")
            .map(|g| g.parse::<i64>().map_err(|_| ApiError::bad_request("gracePeriodSeconds must be an integer")))
            .transpose()?,
    };
    let dry_run = doc["dryRun"].as_array().is_some_and(|d| d.iter().any(|x| x == "All"))
        || query.get("dryRun").is_some_and(|d| d == "All");
    Ok(DeleteOptions {
        grace_period,
        propagation,
        precondition_uid: doc["preconditions"]["uid"].as_str().map(str::to_owned),
        precondition_rv: doc["preconditions"]["resourceVersion"].as_str().map(str::to_owned),
        dry_run,
    })
}

/// Selectors and namespace a list or watch filters by.
struct Filter {
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filter {
    fn new(target: &Target, query: &Query, name: Option<&str>) -> ApiResult<Self> {
        let labels = LabelSelector::parse(query.get("labelSelector").map(String::as_str).unwrap_or(""))
            .map_err(ApiError::bad_request)?;
        let mut field_text = query.get("fieldSelector").cloned().unwrap_or_default();
        if let Some(name) = name {
            if !field_text.is_empty() {
                field_text.push(',');
            }
            field_text.push_str(&format!("metadata.name={name}"));
        }
        let fields = FieldSelector::parse(&field_text, target.rt.builtin()).map_err(ApiError::bad_request)?;
        Ok(Self {
            namespace: target.namespace.clone(),
            labels,
            fields,
        })
    }

    fn matches(&self, rt: &ResourceType, stored: &Value) -> bool {
        if let Some(ns) = &self.namespace
            && stored["metadata"]["namespace"].as_str().unwrap_or("") != ns {
                return false;
            }
        if !self.labels.matches(stored["metadata"]["labels"].as_object()) {
            return false;
        }
        if self.fields.is_empty() {
            return true;
        }
        if rt.builtin() == Some(BuiltinKind::EventV1) {
            // Field selectors on events see both shapes.
            return self.fields.matches(stored) || self.fields.matches(&registry::to_output(rt, stored));
        }
        self.fields.matches(stored)
    }
}

fn parse_rv(text: &str) -> ApiResult<u64> {
    text.parse::<u64>()
        .map_err(|_| ApiError::bad_request(format!("invalid resource version {text:?}: must be an unsigned integer")))
}

fn list_response(rt: &ResourceType, items: &[Arc<Value>], rv: u64, cont: Option<(String, usize)>, output: Output) -> Response {
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if let Some((token, remaining)) = cont {
        meta["continue"] = json!(token);
        meta["remainingItemCount"] = json!(remaining);
    }
    let objects: Vec<Value> = items.iter().map(|o| registry::to_output(rt, o)).collect();
    let body = match output {
        Output::Json => json!({"apiVersion": rt.api_version(), "kind": rt.list_kind, "metadata": meta, "items": objects}),
        Output::Metadata => json!({
            "apiVersion": "meta.k8s.io/v1",
            "kind": "PartialObjectMetadataList",
            "metadata": meta,
            "items": objects.iter().map(table::partial_metadata).collect::<Vec<_>>(),
        }),
        Output::Table(include) => {
            let refs: Vec<&Value> = objects.iter().collect();
            table::table(rt, &refs, include, meta, Utc::now())
        }
    };
    json_response(StatusCode::OK, &body, &[])
}

fn list(shared: &Arc<Shared>, target: &Target, query: &Query, headers: &HeaderMap) -> ApiResult<Response> {
    let output = negotiate(headers, query)?;
    let rt = &target.rt;
    let limit = match query.get("limit") {
        Some(l) => l
            .parse::<usize>()
            .map_err(|_| ApiError::bad_request("limit must be a non-negative integer"))?,
        None => 0,
    };
    if let Some(token) = query.get("continue").filter(|t| !t.is_empty()) {
        let mut pages = shared.pages.lock().unwrap_or_else(|p| p.into_inner());
        let page = pages.remove(token).filter(|p| p.created.elapsed() < PAGE_TTL).ok_or_else(|| {
            ApiError::gone(
                "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
            )
        })?;
        return Ok(paginate(shared, &mut pages, rt, page, limit, output));
    }
    let filter = Filter::new(target, query, None)?;
    let (items, rv) = {
        let state = shared.lock();
        let current = state.store.current_rv();
        if let Some(rv) = query.get("resourceVersion").filter(|v| !v.is_empty() && *v != "0") {
            let rv = parse_rv(rv)?;
            match query.get("resourceVersionMatch").map(String::as_str) {
                Some("Exact") if rv != current => {
                    return Err(ApiError::gone(format!("too old resource version: {rv} ({current})")));
                }
                Some("Exact" | "NotOlderThan") | None => {}
                Some(other) => return Err(ApiError::bad_request(format!("unsupported resourceVersionMatch {other:?}"))),
            }
        }
        let items: Vec<Arc<Value>> = state
            .store
            .list(&rt.storage, filter.namespace.as_deref())
            .filter(|o| filter.matches(rt, o))
            .cloned()
            .collect();
        (items, current)
    };
    let page = Page {
        items: Arc::new(items),
        offset: 0,
        rv,
        created: Instant::now(),
    };
    let mut pages = shared.pages.lock().unwrap_or_else(|p| p.into_inner());
    Ok(paginate(shared, &mut pages, rt, page, limit, output))
}

fn paginate(shared: &Shared, pages: &mut HashMap<String, Page>, rt: &ResourceType, page: Page, limit: usize, output: Output) -> Response {
    let _ = shared;
    let remaining = page.items.len() - page.offset;
    if limit == 0 || remaining <= limit {
        return list_response(rt, &page.items[page.offset..], page.rv, None, output);
    }
    let end = page.offset + limit;
    let token = uuid::Uuid::new_v4().simple().to_string();
    let response = list_response(rt, &page.items[page.offset..end], page.rv, Some((token.clone(), page.items.len() - end)), output);
    pages.retain(|_, p| p.created.elapsed() < PAGE_TTL);
    if pages.len() >= MAX_PAGES
        && let Some(oldest) = pages.iter().min_by_key(|(_, p)| p.created).map(|(k, _)| k.clone()) {
            pages.remove(&oldest);
        }
    pages.insert(
        token,
        Page {
            items: page.items.clone(),
            offset: end,
            rv: page.rv,
            created: page.created,
        },
    );
    response
}

async fn delete_collection(shared: &Arc<Shared>, target: &Target, query: &Query, body: Body) -> ApiResult<Response> {
    let rt = &target.rt;
    let del = delete_options(query, &read_body(body).await?)?;
    let filter = Filter::new(target, query, None)?;
    let mut state = shared.lock();
    let names: Vec<(String, String)> = state
        .store
        .list(&rt.storage, filter.namespace.as_deref())
        .filter(|o| filter.matches(rt, o))
        .map(|o| {
            (
                o["metadata"]["namespace"].as_str().unwrap_or("").to_owned(),
                o["metadata"]["name"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    let mut items = Vec::new();
    for (ns, name) in names {
        match registry::delete(&mut state, rt, &ns, &name, &del) {
            Ok(DeleteOutcome::Gone(obj) | DeleteOutcome::Pending(obj)) => items.push(registry::to_output(rt, &obj)),
            Err(e) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    let rv = state.store.current_rv();
    Ok(json_response(
        StatusCode::OK,
        &json!({"apiVersion": rt.api_version(), "kind": rt.list_kind, "metadata": {"resourceVersion": rv.to_string()}, "items": items}),
        &[],
    ))
}

fn pod_log(shared: &Shared, ns: &str, name: &str, query: &Query) -> ApiResult<Response> {
    let state = shared.lock();
    let pods = state.catalog.find("", "v1", "pods").cloned().ok_or_else(ApiError::no_route)?;
    let pod = registry::get(&state, &pods, ns, name)?;
    drop(state);
    let containers: Vec<String> = pod["spec"]["containers"]
        .as_array()
        .map(|cs| cs.iter().filter_map(|c| c["name"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    let container = match query.get("container") {
        Some(c) => c.clone(),
        None if containers.len() == 1 => containers[0].clone(),
        None => {
            return Err(ApiError::bad_request(format!(
                "a container name must be specified for pod {name}, choose one of: {containers:?}"
            )));
        }
    };
    let Some(dir) = &shared.pod_log_dir else {
        return Err(ApiError::bad_request("logs are not available: this control plane runs without a pod runner log directory"));
    };
    let uid = pod["metadata"]["uid"].as_str().unwrap_or("");
    let file = if flag(query, "previous") { format!("{container}.previous.log") } else { format!("{container}.log") };
    let path = dir.join(ns).join(format!("{name}_{uid}")).join(file);
    let text = std::fs::read_to_string(&path).map_err(|_| {
        ApiError::bad_request(format!("container \"{container}\" in pod \"{name}\" is waiting to start: no logs yet"))
    })?;
    let text = match query.get("tailLines").and_then(|t| t.parse::<usize>().ok()) {
        Some(n) => {
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(n);
            let mut tail = lines[start..].join("\n");
            if !tail.is_empty() {
                tail.push('\n');
            }
            tail
        }
        None => text,
    };
    let mut response = (StatusCode::OK, text).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    Ok(response)
}

/// A running watch: where it is in the history and what it filters.
struct WatchStream {
    shared: Arc<Shared>,
    rt: ResourceType,
    filter: Filter,
    output: Output,
    bookmarks: bool,
    cursor: u64,
    pending: VecDeque<Bytes>,
    changes: watch::Receiver<u64>,
    deadline: tokio::time::Instant,
    next_bookmark: tokio::time::Instant,
    done: bool,
}

fn event_line(event_type: &str, object: Value) -> Bytes {
    let mut line = json!({"type": event_type, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

impl WatchStream {
    fn render(&self, stored: &Value) -> Value {
        let obj = registry::to_output(&self.rt, stored);
        match self.output {
            Output::Json => obj,
            Output::Metadata => table::partial_metadata(&obj),
            Output::Table(include) => {
                let meta = json!({"resourceVersion": obj["metadata"]["resourceVersion"]});
                table::table(&self.rt, &[&obj], include, meta, Utc::now())
            }
        }
    }

    fn bookmark(&self, initial_end: bool) -> Bytes {
        let mut meta = json!({"resourceVersion": self.cursor.to_string()});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        event_line("BOOKMARK", json!({"kind": self.rt.kind, "apiVersion": self.rt.api_version(), "metadata": meta}))
    }

    fn gone(&mut self, requested: u64, oldest: u64) {
        let err = ApiError::gone(format!("too old resource version: {requested} ({oldest})"));
        self.pending.push_back(event_line("ERROR", err.to_status()));
        self.done = true;
    }

    /// Queues the events after the cursor that this watch sees.
    fn catch_up(&mut self) {
        let events = {
            let state = self.shared.lock();
            state.store.events_after(self.cursor)
        };
        match events {
            Err(compacted) => {
                let requested = self.cursor;
                self.gone(requested, compacted.oldest);
            }
            Ok(events) => {
                for event in events {
                    self.cursor = event.rv;
                    if let Some(line) = self.translate(&event) {
                        self.pending.push_back(line);
                    }
                }
            }
        }
    }

    /// An event as this watch's selectors see it: objects entering the selection are ADDED,
    /// objects leaving it are DELETED.
    fn translate(&self, event: &StoredEvent) -> Option<Bytes> {
        if event.storage != self.rt.storage {
            return None;
        }
        let now = self.filter.matches(&self.rt, &event.object);
        let before = event.previous.as_deref().is_some_and(|p| self.filter.matches(&self.rt, p));
        let kind = match event.kind {
            EventType::Added if now => "ADDED",
            EventType::Modified if now && before => "MODIFIED",
            EventType::Modified if now => "ADDED",
            EventType::Modified if before => "DELETED",
            EventType::Deleted if now || before => "DELETED",
            _ => return None,
        };
        Some(event_line(kind, self.render(&event.object)))
    }

    async fn next_chunk(mut self) -> Option<(Result<Bytes, std::io::Error>, Self)> {
        loop {
            if !self.pending.is_empty() {
                let mut chunk = Vec::new();
                while let Some(line) = self.pending.pop_front() {
                    chunk.extend_from_slice(&line);
                }
                return Some((Ok(Bytes::from(chunk)), self));
            }
            if self.done {
                return None;
            }
            self.catch_up();
            if !self.pending.is_empty() {
                continue;
            }
            let shutdown = self.shared.shutdown.clone();
            tokio::select! {
                _ = shutdown.cancelled() => self.done = true,
                _ = tokio::time::sleep_until(self.deadline) => self.done = true,
                changed = self.changes.changed() => if changed.is_err() { self.done = true },
                _ = tokio::time::sleep_until(self.next_bookmark), if self.bookmarks => {
                    self.next_bookmark = tokio::time::Instant::now() + self.shared.bookmark_interval;
                    let line = self.bookmark(false);
                    self.pending.push_back(line);
                }
            }
        }
    }
}

fn watch(shared: &Arc<Shared>, target: &Target, query: &Query, headers: &HeaderMap, name: Option<String>) -> ApiResult<Response> {
    let output = negotiate(headers, query)?;
    let filter = Filter::new(target, query, name.as_deref())?;
    let bookmarks = flag(query, "allowWatchBookmarks");
    let rv_param = query.get("resourceVersion").cloned().unwrap_or_default();
    let send_initial = match query.get("sendInitialEvents").map(String::as_str) {
        Some("true") => {
            if query.get("resourceVersionMatch").map(String::as_str) != Some("NotOlderThan") {
                return Err(ApiError::invalid(
                    target.rt.subject(),
                    "",
                    vec![status::Cause::new("FieldValueInvalid", "resourceVersionMatch", "Invalid value: sendInitialEvents requires resourceVersionMatch=NotOlderThan")],
                ));
            }
            true
        }
        Some("false") => false,
        _ => rv_param.is_empty() || rv_param == "0",
    };
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .filter(|t| *t > 0)
        .unwrap_or(1800)
        .min(3600);
    let now = tokio::time::Instant::now();
    let mut stream = WatchStream {
        shared: shared.clone(),
        rt: target.rt.clone(),
        filter,
        output,
        bookmarks,
        cursor: 0,
        pending: VecDeque::new(),
        changes: shared.changes.clone(),
        deadline: now + Duration::from_secs(timeout),
        next_bookmark: now + shared.bookmark_interval,
        done: false,
    };
    stream.changes.mark_unchanged();
    {
        let state = shared.lock();
        let current = state.store.current_rv();
        if send_initial {
            let initial: Vec<Arc<Value>> = state
                .store
                .list(&target.rt.storage, stream.filter.namespace.as_deref())
                .filter(|o| stream.filter.matches(&target.rt, o))
                .cloned()
                .collect();
            drop(state);
            for obj in initial {
                let line = event_line("ADDED", stream.render(&obj));
                stream.pending.push_back(line);
            }
            stream.cursor = current;
            if query.get("sendInitialEvents").map(String::as_str) == Some("true") && bookmarks {
                let line = stream.bookmark(true);
                stream.pending.push_back(line);
            }
        } else if rv_param.is_empty() || rv_param == "0" {
            stream.cursor = current;
        } else {
            let rv = parse_rv(&rv_param)?;
            stream.cursor = rv.min(current);
            if let Err(compacted) = state.store.events_after(rv) {
                drop(state);
                stream.gone(rv, compacted.oldest);
            }
        }
    }
    let body = Body::from_stream(futures::stream::unfold(stream, WatchStream::next_chunk));
    let mut response = (StatusCode::OK, body).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}
