//! The phone's side of linking a companion device: reading the QR code, the pair-code key
//! exchange, and the signed device identity ("ADV") that proves the account approved the
//! device.
//!
//! Identity layout (as WhatsApp and whatsmeow define it): `AdvDeviceIdentity` is signed by
//! the account key over `06 00 || details || device identity key`; the device counter-signs
//! `06 01 || details || device identity key || account key`; the container carries an
//! HMAC-SHA256 of the details under the ADV secret the companion generated.

use aes::cipher::{KeyIvInit, StreamCipher};
use aes_gcm::aead::{Aead, KeyInit};
use base64::Engine as _;
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use prost::Message as _;
use rand::Rng;
use sha2::Sha256;
use wa_rs_libsignal::protocol::{KeyPair, PublicKey};
use wa_rs_proto::whatsapp::{AdvDeviceIdentity, AdvSignedDeviceIdentity, AdvSignedDeviceIdentityHmac};

const ACCOUNT_SIGNATURE_PREFIX: [u8; 2] = [6, 0];
const DEVICE_SIGNATURE_PREFIX: [u8; 2] = [6, 1];
/// PBKDF2 rounds for pair codes (2^17, as WhatsApp's clients use).
const PAIR_CODE_ROUNDS: u32 = 131_072;

type Aes256Ctr = ctr::Ctr128BE<aes::Aes256>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LinkError {
    #[error("QR code is not ref,noise,identity,secret: {0}")]
    BadQr(&'static str),
    #[error("device identity is malformed: {0}")]
    BadIdentity(&'static str),
    #[error("signature does not verify: {0}")]
    BadSignature(&'static str),
    #[error("pair code does not match the one the device shows")]
    WrongPairCode,
    #[error("key bundle is malformed: {0}")]
    BadBundle(&'static str),
}

/// What a WhatsApp QR code carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QrCode {
    pub pairing_ref: String,
    pub noise_public: [u8; 32],
    pub identity_public: [u8; 32],
    pub adv_secret: [u8; 32],
}

pub fn parse_qr(code: &str) -> Result<QrCode, LinkError> {
    let parts: Vec<&str> = code.trim().split(',').collect();
    let [pairing_ref, noise, identity, secret] = parts[..] else {
        return Err(LinkError::BadQr("expected four comma-separated parts"));
    };
    let key = |s: &str, what| -> Result<[u8; 32], LinkError> {
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or(LinkError::BadQr(what))
    };
    if pairing_ref.is_empty() {
        return Err(LinkError::BadQr("empty ref"));
    }
    Ok(QrCode {
        pairing_ref: pairing_ref.to_owned(),
        noise_public: key(noise, "noise key is not 32 bytes of base64")?,
        identity_public: key(identity, "identity key is not 32 bytes of base64")?,
        adv_secret: key(secret, "ADV secret is not 32 bytes of base64")?,
    })
}

/// The identity the phone grants a new companion, before the companion counter-signs it.
pub struct Grant {
    /// `AdvSignedDeviceIdentityHmac`, sent in `<pair-success><device-identity>`.
    pub container: Vec<u8>,
    /// The encoded `AdvDeviceIdentity` the signatures cover.
    pub details: Vec<u8>,
}

pub fn grant(account: &KeyPair, companion_identity: &[u8; 32], adv_secret: &[u8; 32], key_index: u32) -> Result<Grant, LinkError> {
    let details = AdvDeviceIdentity {
        raw_id: Some(rand::rng().random()),
        timestamp: Some(chrono::Utc::now().timestamp() as u64),
        key_index: Some(key_index),
        account_type: None,
        device_type: None,
    }
    .encode_to_vec();
    let msg = [&ACCOUNT_SIGNATURE_PREFIX[..], &details, companion_identity].concat();
    let account_signature = account
        .private_key
        .calculate_signature(&msg, &mut rand::rng())
        .map_err(|_| LinkError::BadSignature("cannot sign with the account key"))?;
    let signed = AdvSignedDeviceIdentity {
        details: Some(details.clone()),
        account_signature_key: Some(account.public_key.public_key_bytes().to_vec()),
        account_signature: Some(account_signature.to_vec()),
        device_signature: None,
    }
    .encode_to_vec();
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(adv_secret).map_err(|_| LinkError::BadIdentity("ADV secret"))?;
    mac.update(&signed);
    let container = AdvSignedDeviceIdentityHmac {
        details: Some(signed),
        hmac: Some(mac.finalize().into_bytes().to_vec()),
        account_type: None,
    }
    .encode_to_vec();
    Ok(Grant { container, details })
}

/// Checks the identity the companion sent back in `<pair-device-sign>`: same details, the
/// account signature we made, and a valid device signature by the companion's identity key.
/// Returns the key index it claims.
pub fn verify_countersigned(
    signed: &[u8],
    grant_details: &[u8],
    account_public: &[u8; 32],
    companion_identity: &[u8; 32],
) -> Result<u32, LinkError> {
    let signed = AdvSignedDeviceIdentity::decode(signed).map_err(|_| LinkError::BadIdentity("not a protobuf"))?;
    let details = signed.details.as_deref().ok_or(LinkError::BadIdentity("no details"))?;
    if details != grant_details {
        return Err(LinkError::BadIdentity("details differ from the ones granted"));
    }
    if signed.account_signature_key.as_deref() != Some(&account_public[..]) {
        return Err(LinkError::BadIdentity("account key differs"));
    }
    let account = PublicKey::from_djb_public_key_bytes(account_public).map_err(|_| LinkError::BadIdentity("account key"))?;
    let account_msg = [&ACCOUNT_SIGNATURE_PREFIX[..], details, companion_identity].concat();
    if !account.verify_signature(&account_msg, signed.account_signature.as_deref().unwrap_or_default()) {
        return Err(LinkError::BadSignature("account signature"));
    }
    let device = PublicKey::from_djb_public_key_bytes(companion_identity).map_err(|_| LinkError::BadIdentity("device key"))?;
    let device_msg = [&DEVICE_SIGNATURE_PREFIX[..], details, companion_identity, account_public].concat();
    if !device.verify_signature(&device_msg, signed.device_signature.as_deref().unwrap_or_default()) {
        return Err(LinkError::BadSignature("device signature"));
    }
    let identity = AdvDeviceIdentity::decode(details).map_err(|_| LinkError::BadIdentity("details"))?;
    Ok(identity.key_index.unwrap_or(0))
}

fn pair_code_key(code: &str, salt: &[u8]) -> [u8; 32] {
    let mut key = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(code.as_bytes(), salt, PAIR_CODE_ROUNDS, &mut key);
    key
}

/// Reads `salt(32) || iv(16) || AES-CTR(key)(32)` with the code the user typed.
pub fn unwrap_ephemeral(wrapped: &[u8], code: &str) -> Result<[u8; 32], LinkError> {
    if wrapped.len() != 80 {
        return Err(LinkError::BadBundle("wrapped ephemeral key is not 80 bytes"));
    }
    let key = pair_code_key(&code.to_ascii_uppercase(), &wrapped[..32]);
    let mut out = [0u8; 32];
    out.copy_from_slice(&wrapped[48..80]);
    let mut cipher = Aes256Ctr::new(&key.into(), wrapped[32..48].into());
    cipher.apply_keystream(&mut out);
    Ok(out)
}

/// Wraps the phone's ephemeral key the same way, with a fresh salt and IV.
pub fn wrap_ephemeral(public: &[u8; 32], code: &str) -> Vec<u8> {
    let mut rng = rand::rng();
    let salt: [u8; 32] = rng.random();
    let iv: [u8; 16] = rng.random();
    let key = pair_code_key(&code.to_ascii_uppercase(), &salt);
    let mut ct = *public;
    let mut cipher = Aes256Ctr::new(&key.into(), &iv.into());
    cipher.apply_keystream(&mut ct);
    [&salt[..], &iv[..], &ct[..]].concat()
}

/// What the companion's `companion_finish` bundle reveals.
pub struct KeyBundle {
    pub companion_identity: [u8; 32],
    pub primary_identity: [u8; 32],
    pub random: [u8; 32],
}

/// Opens `salt(32) || iv(12) || AES-GCM(bundle)`; a wrong pair code shows up here as an
/// authentication failure, because both sides derived different shared secrets.
pub fn open_key_bundle(wrapped: &[u8], ephemeral_shared: &[u8; 32]) -> Result<KeyBundle, LinkError> {
    if wrapped.len() < 44 + 16 {
        return Err(LinkError::BadBundle("too short"));
    }
    let hk = Hkdf::<Sha256>::new(Some(&wrapped[..32]), ephemeral_shared);
    let mut key = [0u8; 32];
    hk.expand(b"link_code_pairing_key_bundle_encryption_key", &mut key)
        .map_err(|_| LinkError::BadBundle("hkdf"))?;
    let cipher = aes_gcm::Aes256Gcm::new_from_slice(&key).map_err(|_| LinkError::BadBundle("key"))?;
    let plain = cipher
        .decrypt(aes_gcm::Nonce::from_slice(&wrapped[32..44]), &wrapped[44..])
        .map_err(|_| LinkError::WrongPairCode)?;
    if plain.len() != 96 {
        return Err(LinkError::BadBundle("bundle is not 96 bytes"));
    }
    let part = |i: usize| {
        let mut a = [0u8; 32];
        a.copy_from_slice(&plain[i * 32..(i + 1) * 32]);
        a
    };
    Ok(KeyBundle {
        companion_identity: part(0),
        primary_identity: part(1),
        random: part(2),
    })
}

/// The ADV secret both sides derive after a pair-code exchange.
pub fn pair_code_adv_secret(ephemeral_shared: &[u8; 32], identity_shared: &[u8; 32], random: &[u8; 32]) -> [u8; 32] {
    let ikm = [&ephemeral_shared[..], &identity_shared[..], &random[..]].concat();
    let mut out = [0u8; 32];
    // Expanding 32 bytes from SHA-256 HKDF cannot fail.
    let _ = Hkdf::<Sha256>::new(None, &ikm).expand(b"adv_secret", &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use wa_rs_libsignal::protocol::IdentityKeyPair;

    fn keypair() -> KeyPair {
        KeyPair::from(IdentityKeyPair::generate(&mut rand::rng()))
    }

    fn raw(k: &KeyPair) -> [u8; 32] {
        k.public_key.public_key_bytes().try_into().unwrap()
    }

    #[test]
    fn qr_codes() {
        let b = |n: u8| base64::engine::general_purpose::STANDARD.encode([n; 32]);
        let ok = format!("2@ref,{},{},{}", b(1), b(2), b(3));
        let qr = parse_qr(&ok).unwrap();
        assert_eq!(qr.pairing_ref, "2@ref");
        assert_eq!(qr.noise_public, [1; 32]);
        assert_eq!(qr.adv_secret, [3; 32]);
        assert!(matches!(parse_qr("a,b,c"), Err(LinkError::BadQr(_))));
        assert!(matches!(parse_qr(&format!("r,{},xx,{}", b(1), b(3))), Err(LinkError::BadQr(_))));
        assert!(matches!(parse_qr(&format!(",{},{},{}", b(1), b(2), b(3))), Err(LinkError::BadQr(_))));
    }

    #[test]
    fn grant_and_countersign_round_trip() {
        let account = keypair();
        let device = keypair();
        let g = grant(&account, &raw(&device), &[7; 32], 3).unwrap();
        // What the companion does (wa-rs: PairUtils::do_pair_crypto).
        let container = AdvSignedDeviceIdentityHmac::decode(g.container.as_slice()).unwrap();
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&[7; 32]).unwrap();
        mac.update(container.details.as_deref().unwrap());
        mac.verify_slice(container.hmac.as_deref().unwrap()).unwrap();
        let mut signed = AdvSignedDeviceIdentity::decode(container.details.as_deref().unwrap()).unwrap();
        let msg = [&DEVICE_SIGNATURE_PREFIX[..], &g.details, &raw(&device), &raw(&account)].concat();
        signed.device_signature = Some(device.private_key.calculate_signature(&msg, &mut rand::rng()).unwrap().to_vec());
        let back = signed.encode_to_vec();
        assert_eq!(verify_countersigned(&back, &g.details, &raw(&account), &raw(&device)), Ok(3));

        // A signature by another key is refused.
        let other = keypair();
        signed.device_signature = Some(other.private_key.calculate_signature(&msg, &mut rand::rng()).unwrap().to_vec());
        assert_eq!(
            verify_countersigned(&signed.encode_to_vec(), &g.details, &raw(&account), &raw(&device)),
            Err(LinkError::BadSignature("device signature"))
        );
    }

    #[test]
    fn wrapped_ephemeral_needs_the_right_code() {
        let eph = raw(&keypair());
        let wrapped = wrap_ephemeral(&eph, "ABCD1234");
        assert_eq!(wrapped.len(), 80);
        assert_eq!(unwrap_ephemeral(&wrapped, "abcd1234").unwrap(), eph);
        assert_ne!(unwrap_ephemeral(&wrapped, "ABCD1235").unwrap(), eph);
    }
}
