//! What simulated phones and contacts do: scan a QR code, type a pair code, write to a linked
//! device, read its messages, unlink it. Both the in-process handle and the HTTP control API
//! call these.

use std::time::Duration;

use prost::Message as _;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tracing::info;
use wa_rs_libsignal::protocol::{KeyPair, PublicKey};

use crate::adv::{self, LinkError};
use crate::content;
use crate::media::{self, MediaKind};
use crate::server::Shared;
use crate::signal;
use crate::stanza::{self, Address};
use crate::world::{
    DeviceReceipt, Outbound, PendingLink, ReceivedMessage, SentMessage, World, message_id, phone_digits, random_token,
};

/// How long a phone waits for the device's answers during linking.
const LINK_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum PhoneError {
    #[error("{0:?} is not a phone number")]
    BadPhone(String),
    #[error("no account {0}")]
    UnknownAccount(String),
    #[error("no device is showing this QR code (expired, or already linked)")]
    UnknownQr,
    #[error("no device is waiting for a pair code for {0}")]
    NoPairCodeRequest(String),
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("the device did not complete linking: {0}")]
    LinkFailed(String),
    #[error("{0} has no linked device")]
    NoDevices(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("internal: {0}")]
    Internal(String),
}

impl PhoneError {
    /// A stable code for the HTTP control API.
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadPhone(_) => "BAD_PHONE",
            Self::UnknownAccount(_) => "UNKNOWN_ACCOUNT",
            Self::UnknownQr => "UNKNOWN_QR",
            Self::NoPairCodeRequest(_) => "NO_PAIR_CODE_REQUEST",
            Self::Link(LinkError::WrongPairCode) => "WRONG_PAIR_CODE",
            Self::Link(_) => "BAD_LINK_DATA",
            Self::LinkFailed(_) => "LINK_FAILED",
            Self::NoDevices(_) => "NO_DEVICES",
            Self::BadRequest(_) => "BAD_REQUEST",
            Self::Timeout(_) => "TIMEOUT",
            Self::Internal(_) => "INTERNAL",
        }
    }
}

pub fn digits(phone: &str) -> Result<String, PhoneError> {
    phone_digits(phone).ok_or_else(|| PhoneError::BadPhone(phone.to_owned()))
}

/// A device the phone just linked.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LinkedDevice {
    /// `<phone>:<device>@s.whatsapp.net`
    pub jid: String,
    pub phone: String,
    pub device: u16,
}

/// A linked device as the phone's "Linked devices" screen would show it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceInfo {
    pub id: u16,
    pub jid: String,
    pub platform: String,
    pub online: bool,
    /// Left passive mode: receives stanzas as they happen.
    pub active: bool,
    pub prekeys: usize,
    pub queued: usize,
    pub linked_at: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AccountInfo {
    pub phone: String,
    pub jid: String,
    pub lid: String,
    pub push_name: String,
    pub devices: Vec<DeviceInfo>,
}

/// A device that registered and waits to be linked.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PendingPairing {
    /// The QR refs it was given (each becomes one QR code).
    pub refs: Vec<String>,
    /// The phone number it asked a pair code for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pair_code_phone: Option<String>,
    pub platform: String,
}

/// What a simulated contact sends.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Outgoing {
    Text {
        text: String,
        #[serde(default, rename = "replyTo", skip_serializing_if = "Option::is_none")]
        reply_to: Option<String>,
    },
    Image(MediaOut),
    Video(MediaOut),
    Audio(MediaOut),
    Document(MediaOut),
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MediaOut {
    /// Base64 in JSON.
    #[serde(with = "b64")]
    pub data: Vec<u8>,
    pub mimetype: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption: Option<String>,
}

mod b64 {
    use base64::Engine as _;
        use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .map_err(serde::de::Error::custom)
    }
}

/// A receipt a contact's phone sends for a message it got.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ReceiptKind {
    Delivered,
    Read,
    Played,
}

impl Shared {
    /// The phone of `phone` scans a QR code shown by a registering device and links it.
    pub async fn scan(&self, qr: &str, phone: &str, push_name: Option<&str>) -> Result<LinkedDevice, PhoneError> {
        let phone = digits(phone)?;
        let qr = adv::parse_qr(qr)?;
        let rx = {
            let mut world = self.world.lock().await;
            let conn = world.pairing_by_ref(&qr.pairing_ref).ok_or(PhoneError::UnknownQr)?;
            let reg = &world.pairing[&conn].registration;
            if reg.noise_public != qr.noise_public || reg.identity_public != qr.identity_public {
                // The QR's keys are not the ones the device registered with.
                return Err(PhoneError::UnknownQr);
            }
            start_link(&mut world, conn, &phone, push_name, &qr.adv_secret)?
        };
        self.bump();
        self.await_link(rx).await
    }

    /// The phone of `phone` types the pair code a device shows.
    pub async fn enter_pair_code(&self, phone: &str, code: &str, push_name: Option<&str>) -> Result<LinkedDevice, PhoneError> {
        let phone = digits(phone)?;
        let code = code.trim().replace('-', "").to_ascii_uppercase();
        let (conn, wrapped, companion_identity) = {
            let world = self.world.lock().await;
            let conn = world
                .pairing_by_code_phone(&phone)
                .ok_or_else(|| PhoneError::NoPairCodeRequest(phone.clone()))?;
            let p = &world.pairing[&conn];
            let hello = p.pair_code.as_ref().ok_or_else(|| PhoneError::NoPairCodeRequest(phone.clone()))?;
            (conn, hello.wrapped_ephemeral.clone(), p.registration.identity_public)
        };
        // PBKDF2 with 2^17 rounds: off the async threads.
        let (companion_ephemeral, primary, wrapped_primary) = {
            let code = code.clone();
            tokio::task::spawn_blocking(move || -> Result<_, LinkError> {
                let companion_ephemeral = adv::unwrap_ephemeral(&wrapped, &code)?;
                let primary = KeyPair::generate(&mut rand::rng());
                let public: [u8; 32] = primary.public_key.public_key_bytes().try_into().unwrap_or([0; 32]);
                let wrapped_primary = adv::wrap_ephemeral(&public, &code);
                Ok((companion_ephemeral, primary, wrapped_primary))
            })
            .await
            .map_err(|e| PhoneError::Internal(e.to_string()))??
        };
        let (finish_rx, account_key) = {
            let mut world = self.world.lock().await;
            let account_key = world.account_or_create(&phone, push_name).phone_device.identity().clone();
            let p = world.pairing.get_mut(&conn).ok_or(PhoneError::UnknownQr)?;
            let (tx, rx) = oneshot::channel();
            p.finish_waiter = Some(tx);
            let _ = p.tx.send(Outbound::Node(stanza::link_code_notification(
                &random_token(10),
                wrapped_primary,
                account_key.public_key.public_key_bytes().to_vec(),
            )));
            (rx, account_key)
        };
        let bundle = tokio::time::timeout(LINK_TIMEOUT, finish_rx)
            .await
            .map_err(|_| PhoneError::Timeout("the device did not send its key bundle".into()))?
            .map_err(|_| PhoneError::LinkFailed("the device went away".into()))?;
        let agree = |ours: &KeyPair, theirs: &[u8; 32]| -> Result<[u8; 32], PhoneError> {
            let theirs = PublicKey::from_djb_public_key_bytes(theirs).map_err(|e| PhoneError::Internal(e.to_string()))?;
            ours.private_key
                .calculate_agreement(&theirs)
                .map_err(|e| PhoneError::Internal(e.to_string()))
        };
        let ephemeral_shared = agree(&primary, &companion_ephemeral)?;
        let kb = match adv::open_key_bundle(&bundle, &ephemeral_shared) {
            Ok(kb) => kb,
            Err(e) => {
                // A real phone shows "couldn't link device"; the companion hears nothing more.
                info!(%phone, "pair code did not match");
                return Err(e.into());
            }
        };
        let account_public: [u8; 32] = account_key.public_key.public_key_bytes().try_into().unwrap_or([0; 32]);
        if kb.companion_identity != companion_identity || kb.primary_identity != account_public {
            return Err(PhoneError::LinkFailed("key bundle names other keys".into()));
        }
        let identity_shared = agree(&account_key, &companion_identity)?;
        let adv_secret = adv::pair_code_adv_secret(&ephemeral_shared, &identity_shared, &kb.random);
        let rx = {
            let mut world = self.world.lock().await;
            if !world.pairing.contains_key(&conn) {
                return Err(PhoneError::LinkFailed("the device went away".into()));
            }
            start_link(&mut world, conn, &phone, push_name, &adv_secret)?
        };
        self.bump();
        self.await_link(rx).await
    }

    async fn await_link(&self, rx: oneshot::Receiver<Result<String, String>>) -> Result<LinkedDevice, PhoneError> {
        let jid = tokio::time::timeout(LINK_TIMEOUT, rx)
            .await
            .map_err(|_| PhoneError::Timeout("the device did not confirm the link".into()))?
            .map_err(|_| PhoneError::LinkFailed("the device went away".into()))?
            .map_err(PhoneError::LinkFailed)?;
        let a = Address::parse(&jid).ok_or_else(|| PhoneError::Internal(format!("bad jid {jid}")))?;
        Ok(LinkedDevice {
            jid,
            phone: a.user,
            device: a.device,
        })
    }

    /// Creates an account (a simulated phone) if it does not exist; sets its display name.
    pub async fn register(&self, phone: &str, push_name: Option<&str>) -> Result<AccountInfo, PhoneError> {
        let phone = digits(phone)?;
        let info = {
            let mut world = self.world.lock().await;
            world.account_or_create(&phone, push_name);
            account_info(&world, &phone)
        };
        self.bump();
        info.ok_or(PhoneError::UnknownAccount(phone))
    }

    pub async fn account(&self, phone: &str) -> Result<AccountInfo, PhoneError> {
        let phone = digits(phone)?;
        account_info(&*self.world.lock().await, &phone).ok_or(PhoneError::UnknownAccount(phone))
    }

    pub async fn accounts(&self) -> Vec<AccountInfo> {
        let world = self.world.lock().await;
        world.accounts.keys().filter_map(|p| account_info(&world, p)).collect()
    }

    pub async fn pending_pairings(&self) -> Vec<PendingPairing> {
        pending(&*self.world.lock().await)
    }

    /// Messages the phone of `phone` received from others, oldest first.
    pub async fn received(&self, phone: &str) -> Result<Vec<ReceivedMessage>, PhoneError> {
        let phone = digits(phone)?;
        Ok(self
            .world
            .lock()
            .await
            .received
            .iter()
            .filter(|m| m.to == phone && m.from != phone)
            .cloned()
            .collect())
    }

    /// Copies of its own messages the phone of `phone` got from its linked devices.
    pub async fn own_copies(&self, phone: &str) -> Result<Vec<ReceivedMessage>, PhoneError> {
        let phone = digits(phone)?;
        Ok(self
            .world
            .lock()
            .await
            .received
            .iter()
            .filter(|m| m.to == phone && m.from == phone)
            .cloned()
            .collect())
    }

    /// Receipts linked devices sent for message `id`.
    pub async fn device_receipts(&self, id: &str) -> Vec<DeviceReceipt> {
        self.world
            .lock()
            .await
            .device_receipts
            .iter()
            .filter(|r| r.id == id)
            .cloned()
            .collect()
    }

    /// The contact `from` writes to every linked device of `to`. Returns the message id.
    pub async fn send(&self, from: &str, to: &str, what: &Outgoing) -> Result<String, PhoneError> {
        let from = digits(from)?;
        let to = digits(to)?;
        if from == to {
            return Err(PhoneError::BadRequest("a contact cannot write to itself here".into()));
        }
        let id = message_id();
        let mut world = self.world.lock().await;
        if !world.accounts.contains_key(&to) {
            return Err(PhoneError::UnknownAccount(to));
        }
        if world.accounts[&to].companions.is_empty() {
            return Err(PhoneError::NoDevices(to));
        }
        world.account_or_create(&from, None);
        let (message, is_media) = self.build(&mut world, what)?;
        let plaintext = signal::pad(message.encode_to_vec());
        // Two accounts of one map are needed mutably at once: take the sender out meanwhile.
        let Some(mut sender) = world.accounts.remove(&from) else {
            return Err(PhoneError::UnknownAccount(from));
        };
        let result = async {
            let recipient = world.accounts.get_mut(&to).ok_or_else(|| PhoneError::UnknownAccount(to.clone()))?;
            let mut devices = Vec::new();
            for c in recipient.companions.values_mut() {
                let addr = signal::address(&to, c.id);
                if !sender.phone_device.has_session(&addr) {
                    let bundle = c.take_bundle().to_bundle(c.id).map_err(|e| PhoneError::Internal(e.to_string()))?;
                    sender
                        .phone_device
                        .start_session(&addr, &bundle)
                        .await
                        .map_err(|e| PhoneError::Internal(e.to_string()))?;
                }
                let enc = sender
                    .phone_device
                    .encrypt(&addr, &plaintext)
                    .await
                    .map_err(|e| PhoneError::Internal(e.to_string()))?;
                let node = stanza::message(
                    &Address::user_jid(&from),
                    &id,
                    is_media,
                    &sender.push_name,
                    enc.kind,
                    enc.bytes,
                    false,
                );
                c.deliver(node);
                devices.push(c.id);
            }
            Ok::<_, PhoneError>(devices)
        }
        .await;
        world.accounts.insert(from.clone(), sender);
        let devices = result?;
        world.sent.push(SentMessage {
            id: id.clone(),
            from,
            to,
            devices,
        });
        drop(world);
        self.bump();
        Ok(id)
    }

    fn build(&self, world: &mut World, what: &Outgoing) -> Result<(wa_rs_proto::whatsapp::Message, bool), PhoneError> {
        let (kind, m) = match what {
            Outgoing::Text { text, reply_to } => {
                if text.is_empty() {
                    return Err(PhoneError::BadRequest("text is empty".into()));
                }
                let msg = match reply_to {
                    Some(q) => content::reply_message(text, q),
                    None => content::text_message(text),
                };
                return Ok((msg, false));
            }
            Outgoing::Image(m) => (MediaKind::Image, m),
            Outgoing::Video(m) => (MediaKind::Video, m),
            Outgoing::Audio(m) => (MediaKind::Audio, m),
            Outgoing::Document(m) => (MediaKind::Document, m),
        };
        if m.data.is_empty() {
            return Err(PhoneError::BadRequest("media is empty".into()));
        }
        let sealed = media::seal(&m.data, kind).map_err(|e| PhoneError::Internal(e.to_string()))?;
        let direct_path = format!("/v/t62.7118-24/{}.enc", hex::encode(&sealed.file_enc_sha256[..16]));
        world.blobs.insert(direct_path.clone(), sealed.blob.clone());
        let url = format!("https://{}{direct_path}?ccb=11-4", self.config.media_host);
        let msg = content::media_message(
            kind,
            &sealed,
            &content::Uploaded {
                url: &url,
                direct_path: &format!("{direct_path}?ccb=11-4"),
            },
            m.data.len() as u64,
            &m.mimetype,
            m.filename.as_deref(),
            m.caption.as_deref(),
        );
        Ok((msg, true))
    }

    /// The phone of `from` tells every linked device of `to` that it got (or read) `id`.
    pub async fn receipt(&self, from: &str, to: &str, id: &str, kind: ReceiptKind) -> Result<(), PhoneError> {
        let from = digits(from)?;
        let to = digits(to)?;
        let node = stanza::receipt(
            &Address::user_jid(&from),
            id,
            match kind {
                ReceiptKind::Delivered => None,
                ReceiptKind::Read => Some("read"),
                ReceiptKind::Played => Some("played"),
            },
        );
        let mut world = self.world.lock().await;
        let account = world.accounts.get_mut(&to).ok_or_else(|| PhoneError::UnknownAccount(to.clone()))?;
        if account.companions.is_empty() {
            return Err(PhoneError::NoDevices(to));
        }
        for c in account.companions.values_mut() {
            c.deliver(node.clone());
        }
        drop(world);
        self.bump();
        Ok(())
    }

    /// The phone unlinks a device (or all of them): connected ones are told at once
    /// (`device_removed`), offline ones are refused at their next login. Returns how many.
    pub async fn unlink(&self, phone: &str, device: Option<u16>) -> Result<usize, PhoneError> {
        let phone = digits(phone)?;
        let mut world = self.world.lock().await;
        let account = world.accounts.get_mut(&phone).ok_or_else(|| PhoneError::UnknownAccount(phone.clone()))?;
        let ids: Vec<u16> = account.companions.keys().copied().filter(|d| device.is_none_or(|x| x == *d)).collect();
        for id in &ids {
            if let Some(c) = account.companions.remove(id) {
                if let Some(l) = c.link {
                    let _ = l.tx.send(Outbound::Node(stanza::stream_conflict("device_removed")));
                    let _ = l.tx.send(Outbound::Close);
                }
                info!(%phone, device = id, "device unlinked from the phone");
            }
        }
        drop(world);
        self.bump();
        Ok(ids.len())
    }

    /// Ends the streams of the account's connected devices with `<stream:error code>`; they
    /// reconnect. Returns how many were connected.
    pub async fn stream_error(&self, phone: &str, code: &str) -> Result<usize, PhoneError> {
        let phone = digits(phone)?;
        let mut world = self.world.lock().await;
        let account = world.accounts.get_mut(&phone).ok_or_else(|| PhoneError::UnknownAccount(phone.clone()))?;
        let mut n = 0;
        for c in account.companions.values_mut() {
            if let Some(l) = c.link.take() {
                let _ = l.tx.send(Outbound::Node(stanza::stream_error(code)));
                let _ = l.tx.send(Outbound::Close);
                n += 1;
            }
        }
        drop(world);
        self.bump();
        Ok(n)
    }

    /// Waits until `check` finds something in the world, or the timeout passes.
    pub async fn wait_for<T>(&self, timeout: Duration, check: impl Fn(&World) -> Option<T>) -> Option<T> {
        let mut changed = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(v) = check(&*self.world.lock().await) {
                return Some(v);
            }
            if tokio::time::timeout_at(deadline, changed.changed()).await.is_err() {
                return None;
            }
        }
    }
}

/// Sends `pair-success` to a registering device and files what the answer must match.
fn start_link(
    world: &mut World,
    conn: crate::world::ConnId,
    phone: &str,
    push_name: Option<&str>,
    adv_secret: &[u8; 32],
) -> Result<oneshot::Receiver<Result<String, String>>, PhoneError> {
    if world.pairing.get(&conn).is_some_and(|p| p.link.is_some()) {
        return Err(PhoneError::LinkFailed("this device is already being linked".into()));
    }
    let account = world.account_or_create(phone, push_name);
    let device = account.next_device;
    let key_index = account.next_key_index;
    account.next_device += 1;
    account.next_key_index += 1;
    let lid_user = account.lid.split('@').next().unwrap_or("").to_owned();
    let account_key = account.phone_device.identity().clone();
    let p = world.pairing.get_mut(&conn).ok_or(PhoneError::UnknownQr)?;
    let grant = adv::grant(&account_key, &p.registration.identity_public, adv_secret, key_index)?;
    let iq_id = random_token(12);
    let (tx, rx) = oneshot::channel();
    let _ = p.tx.send(Outbound::Node(stanza::pair_success(
        &iq_id,
        grant.container,
        &Address::device_jid(phone, device),
        &format!("{lid_user}:{device}@{}", stanza::LID_SERVER),
        &p.registration.platform,
    )));
    p.link = Some(PendingLink {
        phone: phone.to_owned(),
        device,
        iq_id,
        details: grant.details,
        waiter: Some(tx),
    });
    info!(%phone, device, "phone approved a new device");
    Ok(rx)
}

fn account_info(world: &World, phone: &str) -> Option<AccountInfo> {
    let a = world.accounts.get(phone)?;
    Some(AccountInfo {
        phone: a.phone.clone(),
        jid: a.jid(),
        lid: a.lid.clone(),
        push_name: a.push_name.clone(),
        devices: a
            .companions
            .values()
            .map(|c| DeviceInfo {
                id: c.id,
                jid: Address::device_jid(&a.phone, c.id),
                platform: c.registration.platform.clone(),
                online: c.link.is_some(),
                active: c.link.as_ref().is_some_and(|l| l.active),
                prekeys: c.prekeys.len(),
                queued: c.queue.len(),
                linked_at: c.linked_at,
            })
            .collect(),
    })
}

pub(crate) fn pending(world: &World) -> Vec<PendingPairing> {
    let mut v: Vec<_> = world
        .pairing
        .iter()
        .filter(|(_, p)| p.link.is_none())
        .map(|(id, p)| {
            (
                *id,
                PendingPairing {
                    refs: p.refs.clone(),
                    pair_code_phone: p.pair_code.as_ref().map(|h| h.phone.clone()),
                    platform: p.registration.platform.clone(),
                },
            )
        })
        .collect();
    v.sort_by_key(|(id, _)| *id);
    v.into_iter().map(|(_, p)| p).collect()
}
