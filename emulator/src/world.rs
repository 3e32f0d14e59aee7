//! The emulator's state: accounts with their simulated phone and linked (real) devices,
//! connections waiting to be linked, uploaded media, and what every simulated phone received.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use rand::Rng;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use wa_rs_binary::node::Node;

use crate::signal::{BundleParts, SignedPreKeyPublic, SimDevice};
use crate::stanza::{self, Address};

pub type ConnId = u64;

/// What a connection task is told to do.
#[derive(Debug)]
pub enum Outbound {
    Node(Node),
    /// Close the socket after everything queued before it.
    Close,
}

pub type OutTx = mpsc::UnboundedSender<Outbound>;

/// The keys a companion registered with (from its registration payload and prekey uploads).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub noise_public: [u8; 32],
    pub identity_public: [u8; 32],
    pub registration_id: u32,
    pub signed_prekey: SignedPreKeyPublic,
    /// What the linked-devices list on the phone shows.
    pub platform: String,
}

/// A pair-code request (`companion_hello`) waiting for the user to type the code.
pub struct PairCodeHello {
    pub phone: String,
    pub wrapped_ephemeral: Vec<u8>,
    pub pairing_ref: String,
}

/// A `pair-success` that was sent and waits for the device's counter-signature.
pub struct PendingLink {
    pub phone: String,
    pub device: u16,
    pub iq_id: String,
    pub details: Vec<u8>,
    pub waiter: Option<oneshot::Sender<Result<String, String>>>,
}

/// A connection that registered (no account yet) and shows QR codes or a pair code.
pub struct PairingConn {
    pub tx: OutTx,
    pub registration: Registration,
    pub refs: Vec<String>,
    pub pair_code: Option<PairCodeHello>,
    pub finish_waiter: Option<oneshot::Sender<Vec<u8>>>,
    pub link: Option<PendingLink>,
}

/// A live connection of a linked device.
pub struct Link {
    pub conn: ConnId,
    pub tx: OutTx,
    /// The device left passive mode; stanzas flow to it directly from now on.
    pub active: bool,
}

/// A real client (the engine under test) linked to an account.
pub struct Companion {
    pub id: u16,
    pub registration: Registration,
    pub key_index: u32,
    /// The `AdvSignedDeviceIdentity` the device counter-signed.
    pub signed_identity: Vec<u8>,
    /// One-time prekeys uploaded and not handed out yet.
    pub prekeys: BTreeMap<u32, [u8; 32]>,
    pub link: Option<Link>,
    /// Stanzas for it while it is offline or passive.
    pub queue: Vec<Node>,
    pub linked_at: DateTime<Utc>,
}

impl Companion {
    /// A bundle for starting a session with this device; uses up one prekey, as the real
    /// server does.
    pub fn take_bundle(&mut self) -> BundleParts {
        let prekey = self.prekeys.pop_first();
        BundleParts {
            registration_id: self.registration.registration_id,
            identity: self.registration.identity_public,
            signed_prekey: self.registration.signed_prekey.clone(),
            prekey,
        }
    }

    /// Sends now if the device is connected and active, queues otherwise.
    pub fn deliver(&mut self, node: Node) {
        match &self.link {
            Some(l) if l.active => {
                if l.tx.send(Outbound::Node(node.clone())).is_err() {
                    self.queue.push(node);
                }
            }
            _ => self.queue.push(node),
        }
    }
}

/// One WhatsApp account: a simulated phone (device 0) and the devices linked to it.
pub struct Account {
    pub phone: String,
    pub lid: String,
    pub push_name: String,
    pub phone_device: SimDevice,
    pub companions: BTreeMap<u16, Companion>,
    pub next_device: u16,
    pub next_key_index: u32,
}

impl Account {
    pub fn jid(&self) -> String {
        Address::user_jid(&self.phone)
    }
}

/// A message a simulated phone received, decrypted.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReceivedMessage {
    pub id: String,
    /// Sender's phone number (digits).
    pub from: String,
    pub from_device: u16,
    /// Recipient's phone number (digits); equal to `from` for the copy a sender's own phone gets.
    pub to: String,
    /// `text`, `image`, `video`, `audio`, `document`, `other`, or `undecryptable`.
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caption: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mimetype: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
    /// The decrypted media, base64 in JSON.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "b64_opt")]
    pub media: Option<Vec<u8>>,
    /// Why the media could not be fetched or opened.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub media_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    /// For a sender's own-phone copy: the chat it went to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sent_to: Option<String>,
    /// Why the message could not be decrypted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `pkmsg` or `msg`.
    pub enc_type: String,
    pub received_at: DateTime<Utc>,
}

fn b64_opt<S: serde::Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
    use base64::Engine as _;
    match v {
        Some(b) => s.serialize_some(&base64::engine::general_purpose::STANDARD.encode(b)),
        None => s.serialize_none(),
    }
}

/// A receipt a linked device sent for a message it received.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DeviceReceipt {
    pub id: String,
    /// The account whose device sent it.
    pub account: String,
    pub device: u16,
    /// The chat it was sent to.
    pub chat: String,
    /// `delivery`, `read`, `retry`, …
    pub kind: String,
    pub at: DateTime<Utc>,
}

/// A message a simulated contact sent, and where it went.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SentMessage {
    pub id: String,
    pub from: String,
    pub to: String,
    /// Devices it was encrypted for.
    pub devices: Vec<u16>,
}

pub struct World {
    pub accounts: BTreeMap<String, Account>,
    pub pairing: HashMap<ConnId, PairingConn>,
    /// Uploaded blobs by direct path (without query).
    pub blobs: HashMap<String, Vec<u8>>,
    pub received: Vec<ReceivedMessage>,
    pub device_receipts: Vec<DeviceReceipt>,
    pub sent: Vec<SentMessage>,
    pub media_auth: String,
    next_conn: ConnId,
    next_lid: u64,
}

impl Default for World {
    fn default() -> Self {
        Self::new()
    }
}

impl World {
    pub fn new() -> Self {
        Self {
            accounts: BTreeMap::new(),
            pairing: HashMap::new(),
            blobs: HashMap::new(),
            received: Vec::new(),
            device_receipts: Vec::new(),
            sent: Vec::new(),
            media_auth: random_token(24),
            next_conn: 1,
            next_lid: 100_000_000_000_001,
        }
    }

    pub fn next_conn_id(&mut self) -> ConnId {
        let id = self.next_conn;
        self.next_conn += 1;
        id
    }

    /// The account of `phone` (digits), created with a fresh simulated phone if missing.
    pub fn account_or_create(&mut self, phone: &str, push_name: Option<&str>) -> &mut Account {
        let lid = self.next_lid;
        let created = !self.accounts.contains_key(phone);
        if created {
            self.next_lid += 1;
        }
        let account = self.accounts.entry(phone.to_owned()).or_insert_with(|| Account {
            phone: phone.to_owned(),
            lid: format!("{lid}@{}", stanza::LID_SERVER),
            push_name: push_name.unwrap_or("").to_owned(),
            phone_device: SimDevice::generate(),
            companions: BTreeMap::new(),
            next_device: 1,
            next_key_index: 1,
        });
        if let Some(name) = push_name {
            account.push_name = name.to_owned();
        }
        account
    }

    /// Finds the pairing connection showing this QR ref.
    pub fn pairing_by_ref(&self, pairing_ref: &str) -> Option<ConnId> {
        self.pairing
            .iter()
            .find(|(_, p)| p.refs.iter().any(|r| r == pairing_ref))
            .map(|(id, _)| *id)
    }

    /// Finds the pairing connection that asked for a pair code for `phone`.
    pub fn pairing_by_code_phone(&self, phone: &str) -> Option<ConnId> {
        self.pairing
            .iter()
            .find(|(_, p)| p.pair_code.as_ref().is_some_and(|h| h.phone == phone))
            .map(|(id, _)| *id)
    }

    pub fn companion_mut(&mut self, phone: &str, device: u16) -> Option<&mut Companion> {
        self.accounts.get_mut(phone)?.companions.get_mut(&device)
    }
}

/// A random token of URL-safe letters and digits.
pub fn random_token(len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

/// A message id in WhatsApp Web's style: `3EB0` and 18 uppercase hex digits.
pub fn message_id() -> String {
    let bytes: [u8; 9] = rand::rng().random();
    format!("3EB0{}", hex::encode_upper(bytes))
}

/// Phone digits from `+15551234567`, `15551234567` or a user JID.
pub fn phone_digits(s: &str) -> Option<String> {
    let s = s.trim();
    let s = s.split('@').next().unwrap_or(s);
    let s = s.split(':').next().unwrap_or(s);
    let digits = s.strip_prefix('+').unwrap_or(s);
    let ok = (7..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) && !digits.starts_with('0');
    ok.then(|| digits.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phone_numbers() {
        assert_eq!(phone_digits("+15551234567").as_deref(), Some("15551234567"));
        assert_eq!(phone_digits("15551234567@s.whatsapp.net").as_deref(), Some("15551234567"));
        assert_eq!(phone_digits("15551234567:3@s.whatsapp.net").as_deref(), Some("15551234567"));
        assert_eq!(phone_digits("+0555123"), None);
        assert_eq!(phone_digits("12"), None);
        assert_eq!(phone_digits("abc"), None);
    }

    #[test]
    fn ids_look_like_whatsapp_web_ids() {
        let id = message_id();
        assert_eq!(id.len(), 22);
        assert!(id.starts_with("3EB0"));
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_lowercase()));
    }

    #[test]
    fn accounts_get_distinct_lids() {
        let mut w = World::new();
        let a = w.account_or_create("15550000001", Some("A")).lid.clone();
        let b = w.account_or_create("15550000002", None).lid.clone();
        assert_ne!(a, b);
        assert_eq!(w.account_or_create("15550000001", None).lid, a);
        assert_eq!(w.accounts["15550000001"].push_name, "A");
    }
}
