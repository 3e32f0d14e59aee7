//! Property tests of the gateway's parsers of outside input: the OpenAPI document's patterns
//! agree with the parsers behind them (so a fuzzer's "valid" requests are accepted and the
//! others refused), webhook URLs, multipart send bodies, and webhook signature headers.
//! They never panic, whatever the input.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Request};
use base64::Engine as _;
use proptest::prelude::*;
use regex::Regex;
use wa_api::{PhoneNumber, Recipient, SessionName};

use crate::delivery::{sign, verify};
use crate::http::compat::normalize_recipient;
use crate::http::messages::read_multipart;
use crate::http::webhooks::validate_url;
use crate::openapi::{COMPAT_RECIPIENT_PATTERN, PHONE_PATTERN, RECIPIENT_PATTERN, SESSION_NAME_PATTERN, WEBHOOK_URL_PATTERN};

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

/// The document's patterns are ECMA-262 with `^…$`; Rust's `regex` reads them the same way
/// (no multi-line mode, `$` only at the very end).
fn pattern(p: &'static str) -> &'static Regex {
    // Compiled once per pattern: compiling per case would be most of the run time.
    static CACHE: LazyLock<Mutex<HashMap<&'static str, &'static Regex>>> = LazyLock::new(Mutex::default);
    let mut cache = CACHE.lock().unwrap();
    cache.entry(p).or_insert_with(|| Box::leak(Box::new(Regex::new(p).unwrap())))
}

fn near_recipient() -> impl Strategy<Value = String> {
    let server = prop_oneof![Just("s.whatsapp.net"), Just("c.us"), Just("lid"), Just("g.us"), Just("broadcast"), Just("newsletter"), Just("x.y")];
    prop_oneof![
        r"\+?[0-9]{0,17}",
        ("[-0-9]{1,34}|status", "(:[0-9+]{1,6})?", server).prop_map(|(u, d, s)| format!("{u}{d}@{s}")),
        " ?[0-9]{6,16} ?",
        ".{0,24}",
    ]
}

fn near_url() -> impl Strategy<Value = String> {
    let scheme = prop_oneof![Just("http://"), Just("https://"), Just("HTTP://"), Just("ftp://"), Just("")];
    let host = prop_oneof!["[a-z]{1,10}(\\.[a-z]{1,10}){0,3}", "[A-Za-z0-9.-]{1,16}", "[a-z]{1,5}@[a-z]{1,5}", ".{0,12}"];
    let port = prop_oneof![Just(String::new()), ":[0-9]{1,6}", Just(":".to_owned())];
    let tail = prop_oneof![Just(String::new()), "/[a-z0-9/._%-]{0,20}", "[?#][ -~]{0,20}", "/.{0,12}"];
    (scheme, host, port, tail).prop_map(|(s, h, p, t)| format!("{s}{h}{p}{t}"))
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
}

async fn multipart(body: Vec<u8>, boundary: &str) -> Result<wa_api::pod::SendRequest, crate::error::ApiError> {
    let req = Request::builder()
        .header("content-type", format!("multipart/form-data; boundary={boundary}"))
        .body(Body::from(body))
        .unwrap();
    let mp = Multipart::from_request(req, &()).await.unwrap();
    read_multipart(mp).await
}

/// One part of a multipart body as clients write it.
#[derive(Debug, Clone)]
struct Part {
    name: String,
    filename: Option<String>,
    content_type: Option<String>,
    data: Vec<u8>,
}

fn encode(parts: &[Part], boundary: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        out.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{}\"", p.name).as_bytes());
        if let Some(f) = &p.filename {
            out.extend_from_slice(format!("; filename=\"{f}\"").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        if let Some(ct) = &p.content_type {
            out.extend_from_slice(format!("Content-Type: {ct}\r\n").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&p.data);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    out
}

fn part() -> impl Strategy<Value = Part> {
    let name = prop_oneof![
        Just("to"), Just("type"), Just("text"), Just("caption"), Just("replyTo"), Just("file"), Just("media"), Just("other"), Just(""),
    ];
    (
        name,
        proptest::option::of("[a-z]{1,8}(\\.[a-z]{2,4})?"),
        proptest::option::of(prop_oneof![Just("image/png".to_owned()), Just("application/octet-stream".to_owned()), "[a-z]{1,6}/[a-z]{1,6}"]),
        // Field values never hold the boundary (it is made of characters they do not use).
        proptest::collection::vec(any::<u8>().prop_filter("no '='", |b| *b != b'='), 0..64),
    )
        .prop_map(|(name, filename, content_type, data)| Part { name: name.to_owned(), filename, content_type, data })
}

proptest! {
    #![proptest_config(config(1_000))]

    #[test]
    fn session_name_pattern_is_the_parser(s in prop_oneof!["[a-z][-a-z0-9]{0,56}", "[-a-zA-Z0-9./%_]{0,60}", ".{0,10}"]) {
        prop_assert_eq!(pattern(SESSION_NAME_PATTERN).is_match(&s), s.parse::<SessionName>().is_ok(), "{:?}", s);
    }

    #[test]
    fn phone_pattern_is_the_parser(s in prop_oneof![r"\+[0-9]{0,17}", ".{0,16}"]) {
        prop_assert_eq!(pattern(PHONE_PATTERN).is_match(&s), s.parse::<PhoneNumber>().is_ok(), "{:?}", s);
    }

    #[test]
    fn recipient_pattern_is_the_parser(s in near_recipient()) {
        prop_assert_eq!(pattern(RECIPIENT_PATTERN).is_match(&s), s.parse::<Recipient>().is_ok(), "{:?}", s);
    }

    #[test]
    fn compat_recipients_accept_what_the_pattern_promises(s in near_recipient()) {
        let accepted = normalize_recipient(&s).parse::<Recipient>().is_ok();
        if pattern(COMPAT_RECIPIENT_PATTERN).is_match(&s) {
            prop_assert!(accepted, "{:?} matches the document but is refused", s);
        } else if accepted {
            // Leniency beyond the document: surrounding blanks only.
            prop_assert!(s.trim() != s, "{:?} is accepted but the document refuses it", s);
        }
    }

    #[test]
    fn webhook_urls_accepted_only_when_the_pattern_matches(url in near_url()) {
        let matches = pattern(WEBHOOK_URL_PATTERN).is_match(&url);
        match validate_url(&url) {
            Ok(()) => prop_assert!(matches, "{:?} is accepted but the document refuses it", url),
            Err(e) => prop_assert_eq!(e.code, wa_api::ErrorCode::ValidationFailed),
        }
    }

    #[test]
    fn webhook_urls_with_plain_host_names_are_accepted(
        scheme in prop_oneof![Just("http"), Just("https")],
        labels in proptest::collection::vec("[a-z][a-z0-9]{0,9}", 1..4),
        port in proptest::option::of(1u32..=65535),
        path in "(/[a-zA-Z0-9._~%!$&'()*+,;=:@-]{0,12}){0,3}",
        query in proptest::option::of("[a-z0-9=&]{0,12}"),
    ) {
        let port = port.map(|p| format!(":{p}")).unwrap_or_default();
        let query = query.map(|q| format!("?{q}")).unwrap_or_default();
        let url = format!("{scheme}://{}{port}{path}{query}", labels.join("."));
        prop_assert!(pattern(WEBHOOK_URL_PATTERN).is_match(&url), "{:?}", url);
        prop_assert!(validate_url(&url).is_ok(), "{:?} refused: {:?}", url, validate_url(&url));
    }

    #[test]
    fn webhook_urls_never_carry_credentials_or_blanks(
        user in "[a-z]{1,8}", pass in "[a-z]{0,8}", host in "[a-z]{1,8}\\.[a-z]{2,3}",
        blank in prop_oneof![Just(" "), Just("\t"), Just("\n"), Just("\u{7f}"), Just("\0")],
    ) {
        let with_password = format!("https://{user}:{pass}@{host}/");
        let with_user = format!("https://{user}@{host}/");
        let with_blank = format!("https://{host}/a{blank}b");
        for url in [with_password, with_user, with_blank] {
            prop_assert!(validate_url(&url).is_err(), "{:?} accepted", url);
        }
    }

    #[test]
    fn signature_headers_never_panic(header in prop_oneof![
        ".{0,60}",
        "t=-?[0-9]{1,20},v1=[0-9a-f]{0,64}",
        Just("t=-9223372036854775808,v1=00".to_owned()),
        Just("t=9223372036854775807,v1=00".to_owned()),
    ], now in any::<i64>(), tolerance in prop_oneof![Just(300i64), any::<i64>()]) {
        let _ = verify("secret", &header, b"{}", now, tolerance);
    }

    #[test]
    fn signatures_verify_within_five_minutes_only(
        secret in ".{1,40}", body in proptest::collection::vec(any::<u8>(), 0..200),
        ts in 0i64..4_000_000_000, skew in -1_000i64..1_000,
    ) {
        let header = sign(&secret, ts, &body);
        prop_assert_eq!(verify(&secret, &header, &body, ts + skew, 300), skew.abs() <= 300);
        // Another body or secret never verifies.
        let mut other = body.clone();
        other.push(b'x');
        prop_assert!(!verify(&secret, &header, &other, ts, 300));
        let other_secret = format!("{secret}x");
        prop_assert!(!verify(&other_secret, &header, &body, ts, 300));
    }
}

proptest! {
    #![proptest_config(config(300))]

    #[test]
    fn multipart_sends_round_trip(
        to in "\\+[1-9][0-9]{6,14}",
        text in "[ -~]{0,60}",
        file in proptest::option::of((proptest::collection::vec(any::<u8>(), 1..300), "[a-z]{1,8}\\.(png|pdf)")),
    ) {
        let boundary = "XyZ-boundary-0123";
        let mut parts = vec![
            Part { name: "to".into(), filename: None, content_type: None, data: to.clone().into_bytes() },
            Part { name: "text".into(), filename: None, content_type: None, data: text.clone().into_bytes() },
        ];
        if let Some((data, name)) = &file {
            parts.push(Part { name: "file".into(), filename: Some(name.clone()), content_type: Some("image/png".into()), data: data.clone() });
        }
        let got = block_on(multipart(encode(&parts, boundary), boundary)).unwrap();
        prop_assert_eq!(&got.to, &to);
        prop_assert_eq!(got.text.as_deref(), Some(text.as_str()));
        match file {
            None => {
                prop_assert_eq!(got.kind.as_str(), "text");
                prop_assert!(got.media.is_none());
            }
            Some((data, name)) => {
                prop_assert_eq!(got.kind.as_str(), "document");
                let media = got.media.unwrap();
                prop_assert_eq!(base64::engine::general_purpose::STANDARD.decode(&media.data).unwrap(), data);
                prop_assert_eq!(media.filename.as_deref(), Some(name.as_str()));
                prop_assert_eq!(media.mimetype.as_deref(), Some("image/png"));
            }
        }
    }

    #[test]
    fn multipart_bodies_never_panic(parts in proptest::collection::vec(part(), 0..6), garbage in proptest::collection::vec(any::<u8>(), 0..200), cut in any::<prop::sample::Index>()) {
        let boundary = "XyZ-boundary-0123";
        let body = encode(&parts, boundary);
        // Well-formed: parsed, or refused with a 4xx code.
        if let Err(e) = block_on(multipart(body.clone(), boundary)) {
            prop_assert!((400..500).contains(&e.code.status()), "{:?}", e);
        }
        // Cut short, or followed by garbage: still no panic, and only a 4xx refusal.
        let short = body[..cut.index(body.len() + 1)].to_vec();
        let mut noisy = body;
        noisy.extend_from_slice(&garbage);
        for b in [short, noisy, garbage] {
            if let Err(e) = block_on(multipart(b, boundary)) {
                prop_assert!((400..500).contains(&e.code.status()), "{:?}", e);
            }
        }
    }
}
