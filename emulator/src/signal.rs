//! A simulated phone's Signal side: identity, prekeys, sessions, all in memory.
//!
//! The crypto is `wa-rs-libsignal`'s (the same Signal protocol implementation wa-rs uses);
//! the emulator only supplies the stores and decides what to encrypt for whom.

use std::collections::HashMap;

use async_trait::async_trait;
use rand::TryRngCore as _;
use wa_rs_libsignal::protocol::{
    CiphertextMessage, DeviceId, Direction, GenericSignedPreKey, IdentityChange, IdentityKey, IdentityKeyPair,
    IdentityKeyStore, KeyPair, PreKeyBundle, PreKeyId, PreKeyRecord, PreKeySignalMessage, PreKeyStore,
    ProtocolAddress, PublicKey, SessionRecord, SessionStore, SignalMessage, SignalProtocolError, SignedPreKeyId,
    SignedPreKeyRecord, SignedPreKeyStore, Timestamp, UsePQRatchet, message_decrypt, message_encrypt,
    process_prekey_bundle,
};

type SignalResult<T> = Result<T, SignalProtocolError>;

/// The public half of a signed prekey, as it travels in bundles and uploads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedPreKeyPublic {
    pub id: u32,
    pub public: [u8; 32],
    pub signature: Vec<u8>,
}

/// Everything another party needs to start a session with a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleParts {
    pub registration_id: u32,
    pub identity: [u8; 32],
    pub signed_prekey: SignedPreKeyPublic,
    pub prekey: Option<(u32, [u8; 32])>,
}

impl BundleParts {
    pub fn to_bundle(&self, device: u16) -> SignalResult<PreKeyBundle> {
        let identity = IdentityKey::new(PublicKey::from_djb_public_key_bytes(&self.identity)?);
        let prekey = match &self.prekey {
            Some((id, key)) => Some((PreKeyId::from(*id), PublicKey::from_djb_public_key_bytes(key)?)),
            None => None,
        };
        PreKeyBundle::new(
            self.registration_id,
            DeviceId::from(u32::from(device)),
            prekey,
            SignedPreKeyId::from(self.signed_prekey.id),
            PublicKey::from_djb_public_key_bytes(&self.signed_prekey.public)?,
            self.signed_prekey.signature.clone(),
            identity,
        )
    }
}

#[derive(Default)]
struct Sessions(HashMap<ProtocolAddress, SessionRecord>);

#[async_trait]
impl SessionStore for Sessions {
    async fn load_session(&self, address: &ProtocolAddress) -> SignalResult<Option<SessionRecord>> {
        Ok(self.0.get(address).cloned())
    }
    async fn store_session(&mut self, address: &ProtocolAddress, record: &SessionRecord) -> SignalResult<()> {
        self.0.insert(address.clone(), record.clone());
        Ok(())
    }
}

struct Identities {
    own: IdentityKeyPair,
    registration_id: u32,
    known: HashMap<ProtocolAddress, IdentityKey>,
}

#[async_trait]
impl IdentityKeyStore for Identities {
    async fn get_identity_key_pair(&self) -> SignalResult<IdentityKeyPair> {
        Ok(self.own.clone())
    }
    async fn get_local_registration_id(&self) -> SignalResult<u32> {
        Ok(self.registration_id)
    }
    async fn save_identity(&mut self, address: &ProtocolAddress, identity: &IdentityKey) -> SignalResult<IdentityChange> {
        let old = self.known.insert(address.clone(), *identity);
        Ok(IdentityChange::from_changed(old.is_some_and(|o| o != *identity)))
    }
    // Phones trust on first use and accept key changes (they show a notice); so do we.
    async fn is_trusted_identity(&self, _: &ProtocolAddress, _: &IdentityKey, _: Direction) -> SignalResult<bool> {
        Ok(true)
    }
    async fn get_identity(&self, address: &ProtocolAddress) -> SignalResult<Option<IdentityKey>> {
        Ok(self.known.get(address).copied())
    }
}

#[derive(Default)]
struct PreKeys(HashMap<PreKeyId, PreKeyRecord>);

#[async_trait]
impl PreKeyStore for PreKeys {
    async fn get_pre_key(&self, id: PreKeyId) -> SignalResult<PreKeyRecord> {
        self.0.get(&id).cloned().ok_or(SignalProtocolError::InvalidPreKeyId)
    }
    async fn save_pre_key(&mut self, id: PreKeyId, record: &PreKeyRecord) -> SignalResult<()> {
        self.0.insert(id, record.clone());
        Ok(())
    }
    async fn remove_pre_key(&mut self, id: PreKeyId) -> SignalResult<()> {
        self.0.remove(&id);
        Ok(())
    }
}

struct SignedPreKeys(HashMap<SignedPreKeyId, SignedPreKeyRecord>);

#[async_trait]
impl SignedPreKeyStore for SignedPreKeys {
    async fn get_signed_pre_key(&self, id: SignedPreKeyId) -> SignalResult<SignedPreKeyRecord> {
        self.0.get(&id).cloned().ok_or(SignalProtocolError::InvalidSignedPreKeyId)
    }
    async fn save_signed_pre_key(&mut self, id: SignedPreKeyId, record: &SignedPreKeyRecord) -> SignalResult<()> {
        self.0.insert(id, record.clone());
        Ok(())
    }
}

/// One simulated Signal device (a phone, device 0 of its account).
pub struct SimDevice {
    identity_key: KeyPair,
    registration_id: u32,
    signed_prekey: SignedPreKeyPublic,
    next_prekey_id: u32,
    sessions: Sessions,
    identities: Identities,
    prekeys: PreKeys,
    signed_prekeys: SignedPreKeys,
}

/// A ciphertext for one device, as it goes into an `<enc>` node.
pub struct Encrypted {
    /// `pkmsg` (starts a session) or `msg`.
    pub kind: &'static str,
    pub bytes: Vec<u8>,
}

impl SimDevice {
    pub fn generate() -> Self {
        let mut rng = rand::rng();
        let identity = IdentityKeyPair::generate(&mut rng);
        let identity_key = KeyPair::from(identity.clone());
        let registration_id = rand::Rng::random_range(&mut rng, 1..16380);
        let spk = KeyPair::generate(&mut rng);
        let signature = identity
            .private_key()
            .calculate_signature(&spk.public_key.serialize(), &mut rng)
            .map(|s| s.to_vec())
            .unwrap_or_default();
        let spk_id = 1u32;
        let mut signed = HashMap::new();
        signed.insert(
            SignedPreKeyId::from(spk_id),
            SignedPreKeyRecord::new(
                SignedPreKeyId::from(spk_id),
                Timestamp::from_epoch_millis(chrono::Utc::now().timestamp_millis() as u64),
                &spk,
                &signature,
            ),
        );
        let mut public = [0u8; 32];
        public.copy_from_slice(spk.public_key.public_key_bytes());
        Self {
            identity_key,
            registration_id,
            signed_prekey: SignedPreKeyPublic {
                id: spk_id,
                public,
                signature,
            },
            next_prekey_id: 1,
            sessions: Sessions::default(),
            identities: Identities {
                own: identity,
                registration_id,
                known: HashMap::new(),
            },
            prekeys: PreKeys::default(),
            signed_prekeys: SignedPreKeys(signed),
        }
    }

    /// The identity key pair: for a phone this is also the account's signing key (ADV).
    pub fn identity(&self) -> &KeyPair {
        &self.identity_key
    }

    pub fn identity_public(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.identity_key.public_key.public_key_bytes());
        out
    }

    /// A bundle with a fresh one-time prekey, as the server hands out for a phone that keeps
    /// its prekey supply topped up.
    pub fn fresh_bundle(&mut self) -> BundleParts {
        let id = self.next_prekey_id;
        self.next_prekey_id = if id >= 0xFF_FFFF { 1 } else { id + 1 };
        let kp = KeyPair::generate(&mut rand::rng());
        self.prekeys.0.insert(PreKeyId::from(id), PreKeyRecord::new(PreKeyId::from(id), &kp));
        let mut public = [0u8; 32];
        public.copy_from_slice(kp.public_key.public_key_bytes());
        BundleParts {
            registration_id: self.registration_id,
            identity: self.identity_public(),
            signed_prekey: self.signed_prekey.clone(),
            prekey: Some((id, public)),
        }
    }

    pub fn has_session(&self, remote: &ProtocolAddress) -> bool {
        self.sessions.0.contains_key(remote)
    }

    /// Starts a session with a device from its bundle (X3DH as the initiator).
    pub async fn start_session(&mut self, remote: &ProtocolAddress, bundle: &PreKeyBundle) -> SignalResult<()> {
        process_prekey_bundle(
            remote,
            &mut self.sessions,
            &mut self.identities,
            bundle,
            &mut rand::rngs::OsRng.unwrap_err(),
            UsePQRatchet::No,
        )
        .await
    }

    /// Encrypts for a device we have a session with.
    pub async fn encrypt(&mut self, remote: &ProtocolAddress, plaintext: &[u8]) -> SignalResult<Encrypted> {
        match message_encrypt(plaintext, remote, &mut self.sessions, &mut self.identities).await? {
            CiphertextMessage::PreKeySignalMessage(m) => Ok(Encrypted {
                kind: "pkmsg",
                bytes: m.serialized().to_vec(),
            }),
            CiphertextMessage::SignalMessage(m) => Ok(Encrypted {
                kind: "msg",
                bytes: m.serialized().to_vec(),
            }),
            _ => Err(SignalProtocolError::InvalidArgument("unexpected ciphertext type".into())),
        }
    }

    /// Decrypts a `pkmsg` or `msg` from `remote`.
    pub async fn decrypt(&mut self, remote: &ProtocolAddress, kind: &str, ciphertext: &[u8]) -> SignalResult<Vec<u8>> {
        let message = match kind {
            "pkmsg" => CiphertextMessage::PreKeySignalMessage(PreKeySignalMessage::try_from(ciphertext)?),
            "msg" => CiphertextMessage::SignalMessage(SignalMessage::try_from(ciphertext)?),
            other => {
                return Err(SignalProtocolError::InvalidArgument(format!(
                    "enc type {other:?} is not a 1:1 message"
                )));
            }
        };
        message_decrypt(
            &message,
            remote,
            &mut self.sessions,
            &mut self.identities,
            &mut self.prekeys,
            &self.signed_prekeys,
            &mut rand::rngs::OsRng.unwrap_err(),
            UsePQRatchet::No,
        )
        .await
    }
}

/// The Signal address the emulator files a device under.
pub fn address(user: &str, device: u16) -> ProtocolAddress {
    ProtocolAddress::new(user.to_owned(), DeviceId::from(u32::from(device)))
}

/// WhatsApp's v2 padding: 1-15 bytes, each holding the pad length.
pub fn pad(mut plaintext: Vec<u8>) -> Vec<u8> {
    let mut n = rand::Rng::random::<u8>(&mut rand::rng()) & 0x0F;
    if n == 0 {
        n = 0x0F;
    }
    plaintext.extend(std::iter::repeat_n(n, usize::from(n)));
    plaintext
}

/// Removes v2 padding; `None` when the padding is malformed.
pub fn unpad(plaintext: &[u8]) -> Option<&[u8]> {
    let n = usize::from(*plaintext.last()?);
    if n == 0 || n > plaintext.len() {
        return None;
    }
    let (data, padding) = plaintext.split_at(plaintext.len() - n);
    padding.iter().all(|&b| usize::from(b) == n).then_some(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn two_simulated_devices_talk() {
        let mut alice = SimDevice::generate();
        let mut bob = SimDevice::generate();
        let bob_addr = address("bob", 0);
        let alice_addr = address("alice", 0);
        let bundle = bob.fresh_bundle().to_bundle(0).unwrap();
        alice.start_session(&bob_addr, &bundle).await.unwrap();
        let first = alice.encrypt(&bob_addr, &pad(b"hello".to_vec())).await.unwrap();
        assert_eq!(first.kind, "pkmsg");
        let plain = bob.decrypt(&alice_addr, first.kind, &first.bytes).await.unwrap();
        assert_eq!(unpad(&plain), Some(&b"hello"[..]));
        let reply = bob.encrypt(&alice_addr, &pad(b"hi".to_vec())).await.unwrap();
        assert_eq!(reply.kind, "msg");
        let plain = alice.decrypt(&bob_addr, reply.kind, &reply.bytes).await.unwrap();
        assert_eq!(unpad(&plain), Some(&b"hi"[..]));
        // A replayed message is refused, as Signal must.
        assert!(bob.decrypt(&alice_addr, first.kind, &first.bytes).await.is_err());
    }

    #[test]
    fn padding_round_trips_and_rejects_garbage() {
        for _ in 0..50 {
            let p = pad(b"abc".to_vec());
            assert!(p.len() > 3 && p.len() <= 18);
            assert_eq!(unpad(&p), Some(&b"abc"[..]));
        }
        assert_eq!(unpad(&[]), None);
        assert_eq!(unpad(&[1, 2, 0]), None);
        assert_eq!(unpad(&[1, 3, 2]), None);
        assert_eq!(unpad(&[1, 9]), None);
    }
}
