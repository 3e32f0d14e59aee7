//! Identifiers that come from outside, parsed once at the edge.
//!
//! Everything past the HTTP handlers takes these types, never a `String` that still has
//! to be checked, so a bad phone number or a path-tricking session name is refused in
//! exactly one place with exactly one error.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why an identifier was refused. The message is safe to show to API clients.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("session name must be 1-{max} characters of lowercase letters, digits and '-', starting with a letter and ending with a letter or digit (got {got:?})", max = SessionName::MAX_LEN)]
    SessionName { got: String },
    #[error("phone number must be in E.164 form: '+' then 7-15 digits, no leading zero (got {got:?})")]
    PhoneNumber { got: String },
    #[error("invalid JID {got:?}: {why}")]
    Jid { got: String, why: &'static str },
    #[error("recipient must be a phone number in E.164 form (+15551234567) or a JID (15551234567@s.whatsapp.net) (got {got:?})")]
    Recipient { got: String },
}

/// A session's name: an RFC 1123 DNS label short enough that every derived object name
/// (`wa-<name>`, `wa-<name>-auth`, `wa-<name>-token`) is a valid label too.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionName(String);

impl SessionName {
    /// 63 (label limit) minus the longest derived suffix and prefix (`wa-`, `-token`), rounded down.
    pub const MAX_LEN: usize = 53;

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for SessionName {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = s.as_bytes();
        let ok = !bytes.is_empty()
            && bytes.len() <= Self::MAX_LEN
            && bytes[0].is_ascii_lowercase()
            && bytes[bytes.len() - 1].is_ascii_alphanumeric()
            && bytes
                .iter()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(IdError::SessionName { got: truncate(s) })
        }
    }
}

/// A phone number in E.164 form, stored with its leading `+`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PhoneNumber(String);

impl PhoneNumber {
    /// The JSON-schema pattern the CRD uses for `spec.phoneNumber`; the same rule as `from_str`.
    pub const PATTERN: &'static str = r"^\+[1-9][0-9]{6,14}$";

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The digits without the `+`, as WhatsApp uses them in JIDs.
    pub fn digits(&self) -> &str {
        &self.0[1..]
    }

    /// The user JID of this number (`<digits>@s.whatsapp.net`).
    pub fn to_jid(&self) -> Jid {
        Jid {
            user: self.digits().to_owned(),
            device: None,
            server: JidServer::User,
        }
    }
}

impl FromStr for PhoneNumber {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits = s.strip_prefix('+').unwrap_or("");
        let ok = (7..=15).contains(&digits.len())
            && digits.bytes().all(|b| b.is_ascii_digit())
            && !digits.starts_with('0');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(IdError::PhoneNumber { got: truncate(s) })
        }
    }
}

/// The server part of a JID: which kind of WhatsApp address it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JidServer {
    /// A person (`s.whatsapp.net`; the legacy `c.us` is accepted and normalized to it).
    User,
    /// A person by their LID (`lid`).
    Lid,
    /// A group (`g.us`).
    Group,
    /// A broadcast list or status (`broadcast`).
    Broadcast,
    /// A channel (`newsletter`).
    Newsletter,
}

impl JidServer {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "s.whatsapp.net",
            Self::Lid => "lid",
            Self::Group => "g.us",
            Self::Broadcast => "broadcast",
            Self::Newsletter => "newsletter",
        }
    }
}

/// A WhatsApp address: `user[:device]@server`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Jid {
    pub user: String,
    pub device: Option<u16>,
    pub server: JidServer,
}

impl Jid {
    /// The same address without a device part (the chat a message belongs to).
    pub fn to_non_device(&self) -> Jid {
        Jid {
            device: None,
            ..self.clone()
        }
    }

    pub fn is_group(&self) -> bool {
        self.server == JidServer::Group
    }
}

impl FromStr for Jid {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why| IdError::Jid {
            got: truncate(s),
            why,
        };
        let (user_part, server) = s.split_once('@').ok_or_else(|| err("missing '@'"))?;
        let server = match server {
            "s.whatsapp.net" | "c.us" => JidServer::User,
            "lid" => JidServer::Lid,
            "g.us" => JidServer::Group,
            "broadcast" => JidServer::Broadcast,
            "newsletter" => JidServer::Newsletter,
            _ => return Err(err("unknown server")),
        };
        let (user, device) = match user_part.split_once(':') {
            Some((user, device)) => {
                // Digits only, as WhatsApp writes them: `u16::from_str` alone would also take
                // "+3" and "003", which then print differently from what was given.
                let canonical = !device.is_empty()
                    && device.bytes().all(|b| b.is_ascii_digit())
                    && (device == "0" || !device.starts_with('0'));
                let device = device
                    .parse::<u16>()
                    .ok()
                    .filter(|_| canonical)
                    .ok_or_else(|| err("device must be a number from 0 to 65535, without leading zeros"))?;
                (user, Some(device))
            }
            None => (user_part, None),
        };
        if user.is_empty() || user.len() > 32 {
            return Err(err("user part must be 1-32 characters"));
        }
        let user_ok = match server {
            JidServer::User | JidServer::Lid | JidServer::Newsletter => {
                user.bytes().all(|b| b.is_ascii_digit())
            }
            JidServer::Group => user.bytes().all(|b| b.is_ascii_digit() || b == b'-'),
            JidServer::Broadcast => user == "status" || user.bytes().all(|b| b.is_ascii_digit()),
        };
        if !user_ok {
            return Err(err("user part has characters this server does not allow"));
        }
        if device.is_some() && !matches!(server, JidServer::User | JidServer::Lid) {
            return Err(err("only user JIDs carry a device"));
        }
        Ok(Jid {
            user: user.to_owned(),
            device,
            server,
        })
    }
}

impl fmt::Display for Jid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.device {
            Some(d) => write!(f, "{}:{}@{}", self.user, d, self.server.as_str()),
            None => write!(f, "{}@{}", self.user, self.server.as_str()),
        }
    }
}

/// Whom a message goes to, as clients write it: an E.164 phone number or a JID.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Recipient {
    Phone(PhoneNumber),
    Jid(Jid),
}

impl Recipient {
    /// The chat JID messages to this recipient are sent to.
    pub fn to_jid(&self) -> Jid {
        match self {
            Self::Phone(p) => p.to_jid(),
            Self::Jid(j) => j.to_non_device(),
        }
    }
}

impl FromStr for Recipient {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.starts_with('+') {
            s.parse()
                .map(Self::Phone)
                .map_err(|_| IdError::Recipient { got: truncate(s) })
        } else if s.contains('@') {
            s.parse().map(Self::Jid)
        } else {
            Err(IdError::Recipient { got: truncate(s) })
        }
    }
}

impl fmt::Display for Recipient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Phone(p) => p.fmt(f),
            Self::Jid(j) => j.fmt(f),
        }
    }
}

/// Keeps refused input short in error messages and logs.
fn truncate(s: &str) -> String {
    const MAX: usize = 80;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// `Display`, `Serialize` (as the string) and `Deserialize` (parsing, so bad input fails
/// at deserialization with the type's own message) for the string-like identifiers.
macro_rules! string_id {
    ($($ty:ty),*) => {$(
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    )*};
}
string_id!(SessionName, PhoneNumber, Jid, Recipient);

impl fmt::Display for SessionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for PhoneNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check<T: FromStr + fmt::Display>(input: &str, expected: Option<&str>)
    where
        T::Err: fmt::Debug,
    {
        let got = input.parse::<T>().ok().map(|v| v.to_string());
        assert_eq!(got.as_deref(), expected, "input {input:?}");
    }

    #[test]
    fn session_names() {
        for ok in ["a", "support-line", "a1", "x-1-y", &"a".repeat(53)] {
            check::<SessionName>(ok, Some(ok));
        }
        for bad in [
            "", "A", "1abc", "-a", "a-", "a_b", "a.b", "../x", "a/b", "a b", "ä",
            &"a".repeat(54), "%2e%2e",
        ] {
            check::<SessionName>(bad, None);
        }
    }

    #[test]
    fn phone_numbers() {
        check::<PhoneNumber>("+15551234567", Some("+15551234567"));
        check::<PhoneNumber>("+4915112345678", Some("+4915112345678"));
        check::<PhoneNumber>("+1234567", Some("+1234567"));
        for bad in [
            "15551234567", "+0555123456", "+123456", "+1234567890123456", "+1555 1234567",
            "+1555-123-4567", "+", "", "++15551234567", "+١٢٣٤٥٦٧٨",
        ] {
            check::<PhoneNumber>(bad, None);
        }
    }

    #[test]
    fn phone_pattern_matches_parser() {
        // The CRD's schema pattern and the parser must agree; spot-check the shape of the pattern.
        assert_eq!(PhoneNumber::PATTERN, r"^\+[1-9][0-9]{6,14}$");
        let p: PhoneNumber = "+15551234567".parse().unwrap();
        assert_eq!(p.digits(), "15551234567");
        assert_eq!(p.to_jid().to_string(), "15551234567@s.whatsapp.net");
    }

    #[test]
    fn jids() {
        check::<Jid>("15551234567@s.whatsapp.net", Some("15551234567@s.whatsapp.net"));
        check::<Jid>("15551234567@c.us", Some("15551234567@s.whatsapp.net"));
        check::<Jid>("15551234567:3@s.whatsapp.net", Some("15551234567:3@s.whatsapp.net"));
        check::<Jid>("120363012345678901@g.us", Some("120363012345678901@g.us"));
        check::<Jid>("15551234567-1600000000@g.us", Some("15551234567-1600000000@g.us"));
        check::<Jid>("status@broadcast", Some("status@broadcast"));
        check::<Jid>("123456789@lid", Some("123456789@lid"));
        for bad in [
            "15551234567", "@s.whatsapp.net", "abc@s.whatsapp.net", "1@example.com",
            "1:x@s.whatsapp.net", "1:3@g.us", "1:+3@s.whatsapp.net", "1:03@s.whatsapp.net",
            "1:65536@s.whatsapp.net", "1:@s.whatsapp.net", "1@@s.whatsapp.net", "+1555@s.whatsapp.net",
            &format!("{}@s.whatsapp.net", "1".repeat(33)),
        ] {
            check::<Jid>(bad, None);
        }
    }

    #[test]
    fn recipients() {
        check::<Recipient>("+15551234567", Some("+15551234567"));
        check::<Recipient>("15551234567@s.whatsapp.net", Some("15551234567@s.whatsapp.net"));
        check::<Recipient>("15551234567", None);
        check::<Recipient>("+1", None);
        check::<Recipient>("", None);
        let r: Recipient = "15551234567:2@s.whatsapp.net".parse().unwrap();
        assert_eq!(r.to_jid().to_string(), "15551234567@s.whatsapp.net");
    }

    #[test]
    fn serde_round_trip_and_refusal() {
        let r: Recipient = serde_json::from_str("\"+15551234567\"").unwrap();
        assert_eq!(serde_json::to_string(&r).unwrap(), "\"+15551234567\"");
        let e = serde_json::from_str::<SessionName>("\"../etc\"").unwrap_err();
        assert!(e.to_string().contains("session name"), "{e}");
    }

    #[test]
    fn long_input_is_truncated_in_errors() {
        let long = "x".repeat(10_000);
        let e = long.parse::<SessionName>().unwrap_err().to_string();
        assert!(e.len() < 300, "{}", e.len());
    }
}
