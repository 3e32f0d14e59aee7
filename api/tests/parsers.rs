//! Property tests of the parsers that take outside input (`wa_api::ids`, `SendRequest`):
//! they never panic, accept exactly what their rule says (checked against a regular
//! expression written from the rule, not from the code), round-trip, and refuse path tricks.
//!
//! Runs in about a second (`cargo nextest run -p wa-api --test parsers`).

use std::sync::LazyLock;

use proptest::prelude::*;
use regex::Regex;
use wa_api::pod::{MediaPayload, SendRequest};
use wa_api::{Jid, PhoneNumber, Recipient, SessionName};

const CASES: u32 = 1_000;

fn config() -> ProptestConfig {
    // No regression files in the source tree: a failure prints the shrunk input instead.
    ProptestConfig { cases: CASES, failure_persistence: None, ..ProptestConfig::default() }
}

/// RFC 1123 label, starting with a letter, at most 53 characters (`SessionName::MAX_LEN`).
fn session_rule() -> &'static Regex {
    static RULE: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(r"\A[a-z]([-a-z0-9]{0,51}[a-z0-9])?\z").unwrap()
    });
    &RULE
}
/// E.164: '+', 7-15 digits, no leading zero.
fn phone_rule() -> &'static Regex {
    static RULE: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(r"\A\+[1-9][0-9]{6,14}\z").unwrap()
    });
    &RULE
}
/// `user[:device]@server` as WhatsApp writes them; a device is a u16 written without
/// leading zeros, and only user JIDs (`s.whatsapp.net`, `c.us`, `lid`) carry one.
fn jid_rule() -> &'static Regex {
    static RULE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(concat!(
        r"\A(",
        r"[0-9]{1,32}(:(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3}|0))?@(s\.whatsapp\.net|c\.us|lid)",
        r"|[-0-9]{1,32}@g\.us",
        r"|(status|[0-9]{1,32})@broadcast",
        r"|[0-9]{1,32}@newsletter",
        r")\z"
    ))
    .unwrap()
    });
    &RULE
}

/// Strings that look a little like each kind of input, so the interesting boundaries are hit
/// far more often than by uniform random text.
fn near_session_name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z][-a-z0-9]{0,60}",
        "[-a-zA-Z0-9._/%]{0,60}",
        ".{0,70}",
    ]
}

fn near_phone() -> impl Strategy<Value = String> {
    prop_oneof![r"\+[0-9]{0,17}", r"[+0-9 \-]{0,18}", ".{0,20}", r"\+[١٢٣0-9]{5,16}"]
}

fn near_jid() -> impl Strategy<Value = String> {
    let server = prop_oneof![
        Just("s.whatsapp.net"), Just("c.us"), Just("lid"), Just("g.us"), Just("broadcast"),
        Just("newsletter"), Just("example.com"), Just(""), Just("S.WHATSAPP.NET"),
    ];
    let user = prop_oneof!["[0-9]{0,34}", "[-0-9]{1,34}", Just("status".to_owned()), "[a-z+ ]{1,5}", ".{0,8}"];
    let device = prop_oneof![
        Just(String::new()),
        "(:[0-9]{1,6})",
        Just(":+3".to_owned()),
        Just(":".to_owned()),
        "(:0[0-9]{1,4})",
        "(:-[0-9])",
    ];
    (user, device, server).prop_map(|(u, d, s)| format!("{u}{d}@{s}"))
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn session_names_follow_the_dns_label_rule(s in near_session_name()) {
        let rule = session_rule();
        let parsed = s.parse::<SessionName>();
        prop_assert_eq!(parsed.is_ok(), rule.is_match(&s), "{:?}", s);
        if let Ok(name) = parsed {
            prop_assert_eq!(name.as_str(), s.as_str());
            prop_assert_eq!(name.to_string(), s.clone());
            let json = serde_json::to_string(&name).unwrap();
            prop_assert_eq!(serde_json::from_str::<SessionName>(&json).unwrap(), name);
        } else {
            // Refused through serde too, with the same message.
            let json = serde_json::to_string(&s).unwrap();
            prop_assert!(serde_json::from_str::<SessionName>(&json).is_err());
        }
    }

    #[test]
    fn session_names_refuse_path_tricks(
        base in "[a-z][a-z0-9]{0,20}",
        trick in prop_oneof![
            Just(".."), Just("/"), Just("%2f"), Just("%2F"), Just("%2e%2e"), Just("\\"), Just("."),
            Just("\0"), Just(" "), Just("\n"), Just("A"), Just("Z"), Just("_"), Just("~"), Just("é"),
        ],
        at in 0usize..22,
    ) {
        let at = at.min(base.len());
        let s = format!("{}{}{}", &base[..at], trick, &base[at..]);
        prop_assert!(s.parse::<SessionName>().is_err(), "{:?} was accepted", s);
    }

    #[test]
    fn session_names_refuse_bad_ends_and_lengths(
        body in "[a-z0-9-]{0,60}",
        first in prop_oneof![Just('-'), Just('0'), Just('9')],
        long in "[a-z]{54,80}",
    ) {
        let leading = format!("{first}{body}");
        prop_assert!(leading.parse::<SessionName>().is_err(), "{:?}", leading);
        let trailing = format!("a{body}-");
        prop_assert!(trailing.parse::<SessionName>().is_err(), "{:?}", trailing);
        prop_assert!(long.parse::<SessionName>().is_err(), "{} characters", long.len());
    }

    #[test]
    fn phone_numbers_follow_e164(s in near_phone()) {
        let parsed = s.parse::<PhoneNumber>();
        prop_assert_eq!(parsed.is_ok(), phone_rule().is_match(&s), "{:?}", s);
        if let Ok(p) = parsed {
            prop_assert_eq!(p.to_string(), s.clone());
            prop_assert_eq!(format!("+{}", p.digits()), s.clone());
            // Its JID is a valid user JID of the same digits.
            let jid: Jid = p.to_jid().to_string().parse().unwrap();
            prop_assert_eq!(jid.user.as_str(), p.digits());
            prop_assert_eq!(jid, p.to_jid());
        }
    }

    #[test]
    fn jids_follow_the_rule_and_round_trip(s in near_jid()) {
        let parsed = s.parse::<Jid>();
        prop_assert_eq!(parsed.is_ok(), jid_rule().is_match(&s), "{:?}", s);
        if let Ok(j) = parsed {
            // Display is canonical: it parses back to the same JID, and prints the same again.
            let shown = j.to_string();
            let again: Jid = shown.parse().unwrap();
            prop_assert_eq!(&again, &j);
            prop_assert_eq!(again.to_string(), shown.clone());
            // Only the legacy server name is rewritten.
            prop_assert_eq!(shown, s.replace("@c.us", "@s.whatsapp.net"));
            prop_assert!(j.to_non_device().device.is_none());
        }
    }

    #[test]
    fn recipients_are_phones_or_jids(s in prop_oneof![near_phone(), near_jid(), ".{0,40}"]) {
        let parsed = s.parse::<Recipient>();
        let expected = if s.starts_with('+') { phone_rule().is_match(&s) } else { jid_rule().is_match(&s) };
        prop_assert_eq!(parsed.is_ok(), expected, "{:?}", s);
        if let Ok(r) = parsed {
            let chat = r.to_jid();
            prop_assert!(chat.device.is_none());
            prop_assert_eq!(chat.to_string().parse::<Jid>().unwrap(), chat);
            prop_assert_eq!(r.to_string().parse::<Recipient>().unwrap(), r);
        }
    }

    #[test]
    fn any_text_never_panics_and_errors_stay_short(s in any::<String>(), long in ".{100,400}") {
        for input in [&s, &long] {
            for e in [
                input.parse::<SessionName>().err().map(|e| e.to_string()),
                input.parse::<PhoneNumber>().err().map(|e| e.to_string()),
                input.parse::<Jid>().err().map(|e| e.to_string()),
                input.parse::<Recipient>().err().map(|e| e.to_string()),
            ].into_iter().flatten() {
                // Refused input is echoed at most 80 bytes (plus the rule), cut on a char boundary.
                prop_assert!(e.len() < 80 * 4 + 200, "{} bytes", e.len());
            }
        }
    }

    #[test]
    fn send_requests_validate_without_panicking(
        to in prop_oneof![near_phone(), near_jid()],
        kind in prop_oneof![Just("text"), Just("image"), Just("document"), Just("audio"), Just("video"), Just("sticker"), Just("")],
        text in proptest::option::of(".{0,40}"),
        data in proptest::option::of("[A-Za-z0-9+/=_ -]{0,64}"),
        mimetype in proptest::option::of(prop_oneof!["[a-z]{1,8}/[a-z0-9.+-]{1,12}", ".{0,12}"]),
        filename in proptest::option::of(prop_oneof!["[a-z]{1,8}\\.[a-z]{3}", Just("../../etc/passwd".to_owned()), Just("a/b".to_owned()), ".{0,12}"]),
        caption in proptest::option::of(".{0,20}"),
        reply_to in proptest::option::of(".{0,130}"),
    ) {
        let req = SendRequest {
            to: to.clone(),
            kind: kind.to_owned(),
            text,
            media: data.map(|data| MediaPayload { data, mimetype, filename }),
            caption,
            reply_to,
        };
        match req.validate(64) {
            Ok(msg) => {
                prop_assert_eq!(&msg.to, &to.parse::<Recipient>().unwrap());
                prop_assert_eq!(msg.kind().as_str(), kind);
                if let wa_api::pod::Content::Media(m) = &msg.content {
                    prop_assert!(!m.data.is_empty() && m.data.len() <= 64);
                    if let Some(f) = &m.filename {
                        prop_assert!(!f.contains('/') && !f.contains('\\'), "{:?}", f);
                    }
                }
            }
            Err(e) => prop_assert!((400..500).contains(&e.code.status()), "{:?}", e),
        }
    }
}

#[test]
fn rules_agree_with_the_hand_written_cases() {
    // The reference expressions above are themselves checked on the examples of ids.rs.
    for (s, ok) in [("support-line", true), ("a", true), ("1abc", false), ("a-", false), ("A", false)] {
        assert_eq!(session_rule().is_match(s), ok, "{s}");
    }
    for (s, ok) in [("+15551234567", true), ("+0555123456", false), ("+123456", false)] {
        assert_eq!(phone_rule().is_match(s), ok, "{s}");
    }
    for (s, ok) in [
        ("15551234567:3@s.whatsapp.net", true),
        ("1:03@s.whatsapp.net", false),
        ("1:+3@s.whatsapp.net", false),
        ("1:65535@lid", true),
        ("1:65536@lid", false),
        ("1:0@lid", true),
        ("1:3@g.us", false),
        ("status@broadcast", true),
    ] {
        assert_eq!(jid_rule().is_match(s), ok, "{s}");
    }
}
