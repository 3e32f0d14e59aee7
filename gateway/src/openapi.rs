//! The OpenAPI 3.1 document, built from the same endpoint table that builds the router
//! (`http::endpoints`), so a route cannot exist without its description or the other way
//! round. Body schemas come from the Rust types through `schemars` (JSON Schema 2020-12,
//! which is OpenAPI 3.1's dialect). `gateway/openapi.json` is this document, committed; a
//! test fails when they differ (`wa-gateway openapi > gateway/openapi.json` regenerates it).

use std::collections::BTreeMap;

use schemars::generate::{SchemaGenerator, SchemaSettings};
use schemars::{JsonSchema, Schema};
use serde_json::{Map, Value, json};
use wa_api::ErrorCode;

pub type SchemaFn = fn(&mut SchemaGenerator) -> Schema;

/// The schema of `T` (a `$ref` into `components/schemas` for named types).
pub fn schema<T: JsonSchema>(g: &mut SchemaGenerator) -> Schema {
    g.subschema_for::<T>()
}

/// How a body or response content is described.
#[derive(Clone, Copy)]
pub enum Content {
    Typed(SchemaFn),
    Raw(fn() -> Value),
}

/// Who may call an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Auth {
    None,
    /// Any API key; scoped keys need the permission named in the description.
    Key,
    /// Admin keys only.
    Admin,
    /// The session pod's token.
    PodToken,
    /// The compatible routes: `Authorization: Bearer <key>` or `Authorization: ApiKey <key>`;
    /// their errors are in the older gateways' shape, so none are added here.
    Compat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum In {
    Path,
    Query,
    Header,
}

#[derive(Clone)]
pub struct Param {
    pub name: &'static str,
    pub location: In,
    pub required: bool,
    pub description: &'static str,
    pub schema: fn() -> Value,
}

#[derive(Clone)]
pub struct Resp {
    pub status: u16,
    pub description: String,
    pub content: Vec<(&'static str, Content)>,
    pub headers: Vec<(&'static str, &'static str)>,
}

/// The description of one operation.
#[derive(Clone)]
pub struct Doc {
    pub id: &'static str,
    pub tag: &'static str,
    pub summary: &'static str,
    pub description: &'static str,
    pub auth: Auth,
    pub params: Vec<Param>,
    pub body: Option<(bool, Vec<(&'static str, Content)>)>,
    pub responses: Vec<Resp>,
    /// Not part of the API (the web page's assets).
    pub hidden: bool,
}

fn string_schema() -> Value {
    json!({"type": "string"})
}

fn session_name_schema() -> Value {
    json!({"type": "string", "pattern": "^[a-z]([-a-z0-9]{0,51}[a-z0-9])?$", "maxLength": 53})
}

impl Doc {
    pub fn new(id: &'static str, tag: &'static str, summary: &'static str) -> Doc {
        Doc {
            id,
            tag,
            summary,
            description: "",
            auth: Auth::None,
            params: Vec::new(),
            body: None,
            responses: Vec::new(),
            hidden: false,
        }
    }

    pub fn hidden() -> Doc {
        let mut d = Doc::new("", "", "");
        d.hidden = true;
        d
    }

    pub fn describe(mut self, text: &'static str) -> Self {
        self.description = text;
        self
    }

    /// Adds the errors every operation with this kind of auth can answer.
    pub fn auth(mut self, auth: Auth) -> Self {
        self.auth = auth;
        match auth {
            Auth::None => {}
            // OVERLOADED: the in-flight limit (`http::admission`) counts every keyed route.
            Auth::Key | Auth::Admin => {
                self = self.errors(&[
                    ErrorCode::Unauthorized,
                    ErrorCode::Forbidden,
                    ErrorCode::Unavailable,
                    ErrorCode::Overloaded,
                    ErrorCode::Internal,
                ])
            }
            Auth::PodToken => self = self.errors(&[ErrorCode::Unauthorized, ErrorCode::Unavailable, ErrorCode::Internal]),
            Auth::Compat => {}
        }
        self
    }

    /// The `{name}` path parameter: a session name (422 INVALID_SESSION_NAME otherwise).
    pub fn session_path(mut self) -> Self {
        self.params.push(Param {
            name: "name",
            location: In::Path,
            required: true,
            description: "The session's name (a DNS label).",
            schema: session_name_schema,
        });
        self.errors(&[ErrorCode::InvalidSessionName, ErrorCode::SessionNotFound])
    }

    pub fn path(mut self, name: &'static str, description: &'static str) -> Self {
        self.params.push(Param { name, location: In::Path, required: true, description, schema: string_schema });
        self.errors(&[ErrorCode::InvalidRequest])
    }

    pub fn query(mut self, name: &'static str, description: &'static str, schema: fn() -> Value) -> Self {
        self.params.push(Param { name, location: In::Query, required: false, description, schema });
        self.errors(&[ErrorCode::InvalidRequest])
    }

    pub fn header_with(mut self, name: &'static str, description: &'static str, schema: fn() -> Value) -> Self {
        self.params.push(Param { name, location: In::Header, required: false, description, schema });
        self
    }

    pub fn header(mut self, name: &'static str, description: &'static str) -> Self {
        self.params.push(Param { name, location: In::Header, required: false, description, schema: string_schema });
        self
    }

    /// A required JSON body of type `T`.
    pub fn json_body<T: JsonSchema>(mut self) -> Self {
        self.body = Some((true, vec![("application/json", Content::Typed(schema::<T>))]));
        self.errors(&[ErrorCode::InvalidJson, ErrorCode::InvalidRequest, ErrorCode::PayloadTooLarge, ErrorCode::UnsupportedMediaType])
    }

    /// An optional JSON body (absent means defaults).
    pub fn optional_json_body<T: JsonSchema>(mut self) -> Self {
        self.body = Some((false, vec![("application/json", Content::Typed(schema::<T>))]));
        self.errors(&[ErrorCode::InvalidJson, ErrorCode::InvalidRequest, ErrorCode::PayloadTooLarge, ErrorCode::UnsupportedMediaType])
    }

    pub fn body(mut self, required: bool, content: Vec<(&'static str, Content)>) -> Self {
        self.body = Some((required, content));
        self.errors(&[ErrorCode::InvalidJson, ErrorCode::InvalidRequest, ErrorCode::PayloadTooLarge, ErrorCode::UnsupportedMediaType])
    }

    /// A JSON answer of type `T`.
    pub fn ok<T: JsonSchema>(self, status: u16, description: &'static str) -> Self {
        self.response(status, description, vec![("application/json", Content::Typed(schema::<T>))], vec![])
    }

    pub fn response(
        mut self,
        status: u16,
        description: &str,
        content: Vec<(&'static str, Content)>,
        headers: Vec<(&'static str, &'static str)>,
    ) -> Self {
        self.responses.push(Resp { status, description: description.to_owned(), content, headers });
        self
    }

    /// Error answers with these codes (grouped by status, in the shared error shape).
    pub fn errors(mut self, codes: &[ErrorCode]) -> Self {
        for code in codes {
            let status = code.status();
            match self.responses.iter_mut().find(|r| r.status == status && r.is_error()) {
                Some(r) => {
                    if !r.description.contains(code.as_str()) {
                        r.description.push_str(", ");
                        r.description.push_str(code.as_str());
                    }
                }
                None => {
                    let mut headers = vec![];
                    if matches!(status, 429 | 503) {
                        headers.push(("Retry-After", "Seconds to wait before trying again."));
                    }
                    self.responses.push(Resp {
                        status,
                        description: format!("Error: {}", code.as_str()),
                        content: vec![("application/json", Content::Typed(schema::<wa_api::ErrorBody>))],
                        headers,
                    });
                }
            }
        }
        self
    }
}

impl Resp {
    fn is_error(&self) -> bool {
        self.description.starts_with("Error: ")
    }
}

/// One operation of the document.
pub struct Operation<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub doc: &'a Doc,
}

const INTRO: &str = "The REST API of wa-operator: WhatsApp (Web, multi-device) sessions, sends, history, \
API keys and webhooks.\n\nAuthenticate with `Authorization: Bearer <key>` (keys start with `wak_`). \
Errors share one shape, `{\"error\": {\"code\": \"SESSION_NOT_READY\", \"message\": \"…\"}}`, with stable codes; \
429 and 503 answers carry `Retry-After`.\n\nWebhook deliveries are POSTed with `X-Wa-Signature: t=<unix seconds>,v1=<hex>`, \
where v1 is HMAC-SHA256 of `<t>.<body>` under the webhook's secret.";

/// Builds the document.
pub fn document(ops: &[Operation<'_>]) -> Value {
    let mut generator = SchemaSettings::draft2020_12()
        .with(|s| {
            s.definitions_path = "/components/schemas".into();
            s.meta_schema = None;
        })
        .into_generator();
    let mut paths: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    let mut tags: Vec<&str> = Vec::new();
    for op in ops.iter().filter(|o| !o.doc.hidden) {
        let d = op.doc;
        if !tags.contains(&d.tag) {
            tags.push(d.tag);
        }
        let mut o = Map::new();
        o.insert("operationId".into(), json!(d.id));
        o.insert("tags".into(), json!([d.tag]));
        o.insert("summary".into(), json!(d.summary));
        if !d.description.is_empty() {
            o.insert("description".into(), json!(d.description));
        }
        o.insert(
            "security".into(),
            match d.auth {
                Auth::None => json!([]),
                Auth::Key | Auth::Admin => json!([{"apiKey": []}]),
                Auth::PodToken => json!([{"podToken": []}]),
                Auth::Compat => json!([{"apiKey": []}, {"compatApiKey": []}]),
            },
        );
        if !d.params.is_empty() {
            let params: Vec<Value> = d
                .params
                .iter()
                .map(|p| {
                    json!({
                        "name": p.name,
                        "in": match p.location { In::Path => "path", In::Query => "query", In::Header => "header" },
                        "required": p.required,
                        "description": p.description,
                        "schema": (p.schema)(),
                    })
                })
                .collect();
            o.insert("parameters".into(), Value::Array(params));
        }
        if let Some((required, content)) = &d.body {
            o.insert(
                "requestBody".into(),
                json!({"required": required, "content": content_map(&mut generator, content)}),
            );
        }
        let mut responses = Map::new();
        let mut sorted = d.responses.clone();
        sorted.sort_by_key(|r| r.status);
        for r in &sorted {
            let mut resp = Map::new();
            resp.insert("description".into(), json!(r.description));
            if !r.content.is_empty() {
                resp.insert("content".into(), content_map(&mut generator, &r.content));
            }
            if !r.headers.is_empty() {
                let headers: Map<String, Value> = r
                    .headers
                    .iter()
                    .map(|(n, desc)| ((*n).to_owned(), json!({"description": desc, "schema": {"type": "string"}})))
                    .collect();
                resp.insert("headers".into(), Value::Object(headers));
            }
            responses.insert(r.status.to_string(), Value::Object(resp));
        }
        o.insert("responses".into(), Value::Object(responses));
        paths.entry(op.path.to_owned()).or_default().insert(op.method.to_ascii_lowercase(), Value::Object(o));
    }

    let webhook_payload = generator.subschema_for::<crate::model::WebhookPayload>();
    let mut schemas = generator.take_definitions(true);
    refine(&mut schemas);
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "wa-operator gateway",
            "version": env!("CARGO_PKG_VERSION"),
            "description": INTRO,
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "tags": tags.iter().map(|t| json!({"name": t})).collect::<Vec<_>>(),
        "paths": paths,
        "webhooks": {
            "event": {
                "post": {
                    "summary": "An event of a session (message, receipt, state), POSTed to each matching webhook.",
                    "parameters": [
                        {"name": "X-Wa-Event", "in": "header", "required": true, "schema": {"type": "string", "enum": ["message", "receipt", "state"]}},
                        {"name": "X-Wa-Event-Id", "in": "header", "required": true, "schema": {"type": "string"}},
                        {"name": "X-Wa-Delivery", "in": "header", "required": true, "schema": {"type": "string"}},
                        {"name": "X-Wa-Signature", "in": "header", "required": false,
                         "description": "t=<unix seconds>,v1=<hex HMAC-SHA256 of \"<t>.<body>\">; absent when the webhook has no secret.",
                         "schema": {"type": "string"}}
                    ],
                    "requestBody": {"required": true, "content": {"application/json": {"schema": webhook_payload}}},
                    "responses": {"2XX": {"description": "Delivered. Any other answer (or none within the timeout) is retried with backoff."}}
                }
            }
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer", "description": "An API key (`wak_…`)."},
                "podToken": {"type": "http", "scheme": "bearer", "description": "A session pod's token (internal)."},
                "compatApiKey": {"type": "apiKey", "in": "header", "name": "Authorization", "description": "`ApiKey <key>`, as the older gateways' clients send it."}
            }
        }
    })
}

/// A session name (`wa_api::SessionName`): a DNS label of at most 53 characters.
pub const SESSION_NAME_PATTERN: &str = "^[a-z]([-a-z0-9]{0,51}[a-z0-9])?$";
/// E.164 (`wa_api::PhoneNumber::PATTERN`).
pub const PHONE_PATTERN: &str = wa_api::PhoneNumber::PATTERN;
/// A recipient (`wa_api::Recipient`): an E.164 number or a JID, as the parser takes them.
pub const RECIPIENT_PATTERN: &str = concat!(
    r"^(\+[1-9][0-9]{6,14}",
    r"|[0-9]{1,32}(:(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3}|0))?@(s\.whatsapp\.net|c\.us|lid)",
    r"|[-0-9]{1,32}@g\.us",
    r"|(status|[0-9]{1,32})@broadcast",
    r"|[0-9]{1,32}@newsletter)$"
);
/// What the older gateways' clients write: a recipient, or a bare number.
pub const COMPAT_RECIPIENT_PATTERN: &str = concat!(
    r"^([1-9][0-9]{6,14}",
    r"|\+[1-9][0-9]{6,14}",
    r"|[0-9]{1,32}(:(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3}|0))?@(s\.whatsapp\.net|c\.us|lid)",
    r"|[-0-9]{1,32}@g\.us",
    r"|(status|[0-9]{1,32})@broadcast",
    r"|[0-9]{1,32}@newsletter)$"
);
/// An http(s) webhook URL as `http::webhooks::validate_url` accepts it.
pub const WEBHOOK_URL_PATTERN: &str = concat!(
    r"^https?://[A-Za-z0-9.-]+",
    r"(:(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3}|0))?",
    r"([/?#][^\u0000-\u0020\u007f]*)?$"
);
/// Cursors this API hands out (message and delivery ids).
pub const CURSOR_PATTERN: &str = "^[A-Za-z0-9-]{1,64}$";
/// Non-blank text.
const NON_BLANK: &str = r"\S";

/// Adds to the generated schemas the rules the server checks that the Rust types do not
/// carry (patterns, ranges, conditional requirements), so generated requests that fit the
/// schema are accepted and the others refused.
fn refine(schemas: &mut Map<String, Value>) {
    fn prop(schemas: &mut Map<String, Value>, schema: &str, property: &str, extra: Value) {
        if let Some(Value::Object(p)) = schemas.get_mut(schema).and_then(|s| s.pointer_mut(&format!("/properties/{property}"))) {
            if let Value::Object(extra) = extra {
                p.extend(extra);
            }
        }
    }
    fn add(schemas: &mut Map<String, Value>, schema: &str, key: &str, value: Value) {
        if let Some(Value::Object(s)) = schemas.get_mut(schema) {
            s.insert(key.to_owned(), value);
        }
    }
    let kinds = json!(["text", "image", "document", "audio", "video"]);
    prop(schemas, "SendRequest", "to", json!({"pattern": RECIPIENT_PATTERN}));
    prop(schemas, "SendRequest", "type", json!({"enum": kinds}));
    prop(schemas, "SendRequest", "text", json!({"maxLength": wa_api::pod::MAX_TEXT_CHARS}));
    prop(schemas, "SendRequest", "caption", json!({"maxLength": wa_api::pod::MAX_CAPTION_CHARS}));
    prop(schemas, "SendRequest", "replyTo", json!({"minLength": 1, "maxLength": 128}));
    add(schemas, "SendRequest", "if", json!({"properties": {"type": {"const": "text"}}}));
    add(schemas, "SendRequest", "then", json!({"required": ["text"], "properties": {"text": {"type": "string", "pattern": NON_BLANK}, "media": {"type": "null"}}}));
    add(schemas, "SendRequest", "else", json!({"required": ["media"], "properties": {"media": {"type": "object"}}}));
    prop(schemas, "MediaPayload", "data", json!({"minLength": 2, "pattern": "^[A-Za-z0-9+/_=\\t\\n\\r -]+$"}));
    prop(schemas, "MediaPayload", "filename", json!({"minLength": 1, "maxLength": 255, "pattern": "^[^/\\\\\\u0000]+$"}));
    prop(schemas, "PairCodeRequest", "phoneNumber", json!({"pattern": PHONE_PATTERN}));
    prop(schemas, "ScanRequest", "phoneNumber", json!({"pattern": PHONE_PATTERN}));
    prop(schemas, "ScanRequest", "pushName", json!({"minLength": 1, "maxLength": 100}));
    prop(schemas, "InboundRequest", "from", json!({"pattern": RECIPIENT_PATTERN}));
    prop(schemas, "InboundRequest", "type", json!({"enum": [Value::Null, "text", "image", "document", "audio", "video"]}));
    prop(schemas, "InboundRequest", "pushName", json!({"maxLength": 100}));
    prop(schemas, "InboundRequest", "text", json!({"maxLength": wa_api::pod::MAX_TEXT_CHARS}));
    prop(schemas, "InboundRequest", "caption", json!({"maxLength": wa_api::pod::MAX_CAPTION_CHARS}));
    add(schemas, "InboundRequest", "if", json!({"properties": {"type": {"enum": [Value::Null, "text"]}}}));
    add(schemas, "InboundRequest", "then", json!({"required": ["text"], "properties": {"text": {"type": "string", "pattern": NON_BLANK}, "media": {"type": "null"}}}));
    add(schemas, "InboundRequest", "else", json!({"required": ["media"], "properties": {"media": {"type": "object"}}}));
    prop(schemas, "DisconnectRequest", "seconds", json!({"maximum": 300}));
    prop(schemas, "CreateSession", "name", json!({"pattern": SESSION_NAME_PATTERN}));
    prop(schemas, "CreateSession", "phoneNumber", json!({"pattern": PHONE_PATTERN}));
    prop(schemas, "RateLimit", "messagesPerMinute", json!({"minimum": 1, "maximum": 6000}));
    prop(schemas, "RateLimit", "burst", json!({"minimum": 1, "maximum": 1000}));
    prop(schemas, "CreateKey", "name", json!({"minLength": 1, "maxLength": 100, "pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f]+$"}));
    add(schemas, "CreateKey", "if", json!({"properties": {"admin": {"const": true}}, "required": ["admin"]}));
    add(schemas, "CreateKey", "then", json!({"properties": {"permissions": {"maxItems": 0}, "sessions": {"maxItems": 0}}}));
    add(schemas, "CreateKey", "else", json!({
        "required": ["permissions", "sessions"],
        "properties": {
            "permissions": {"minItems": 1},
            "sessions": {"minItems": 1, "maxItems": 100, "items": {"type": "string", "pattern": SESSION_NAME_PATTERN}}
        }
    }));
    prop(schemas, "CreateWebhook", "url", json!({"maxLength": 2048, "pattern": WEBHOOK_URL_PATTERN}));
    prop(schemas, "CreateWebhook", "secret", json!({"minLength": 16, "maxLength": 256}));
    prop(schemas, "CompatSendText", "recipient", json!({"pattern": COMPAT_RECIPIENT_PATTERN}));
    prop(schemas, "CompatSendText", "message", json!({"pattern": NON_BLANK, "maxLength": wa_api::pod::MAX_TEXT_CHARS}));
    prop(schemas, "CompatSendText", "sessionId", json!({"pattern": SESSION_NAME_PATTERN}));
    prop(schemas, "CompatSend", "to", json!({"pattern": COMPAT_RECIPIENT_PATTERN}));
    prop(schemas, "CompatSend", "type", json!({"enum": [Value::Null, "text", "image", "document", "audio", "video"]}));
    add(schemas, "CompatSend", "if", json!({"properties": {"type": {"enum": [Value::Null, "text"]}}}));
    add(schemas, "CompatSend", "then", json!({"required": ["message"], "properties": {"message": {"type": "string", "pattern": NON_BLANK}}}));
    add(schemas, "CompatSend", "else", json!({"required": ["media"], "properties": {"media": {"type": "string", "minLength": 2}}}));
    prop(schemas, "CompatSessionRequest", "sessionId", json!({"pattern": SESSION_NAME_PATTERN}));
}

fn content_map(generator: &mut SchemaGenerator, content: &[(&'static str, Content)]) -> Value {
    let mut m = Map::new();
    for (mime, c) in content {
        let schema = match c {
            Content::Typed(f) => f(generator).to_value(),
            Content::Raw(f) => f(),
        };
        m.insert((*mime).to_owned(), json!({"schema": schema}));
    }
    Value::Object(m)
}

/// The document as committed: pretty JSON with a trailing newline.
pub fn to_text(doc: &Value) -> String {
    let mut s = serde_json::to_string_pretty(doc).unwrap_or_else(|_| "{}".into());
    s.push('\n');
    s
}
