//! WhatsApp media encryption: a random 32-byte media key expands (HKDF-SHA256, per-kind
//! info string) into IV, AES-256-CBC key and MAC key; the upload is the ciphertext followed
//! by the first 10 bytes of HMAC-SHA256(iv || ciphertext). The server only ever sees this
//! encrypted blob; the keys travel inside the end-to-end encrypted message.

use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use rand::Rng;
use sha2::{Digest, Sha256};
use wa_rs_libsignal::crypto::{aes_256_cbc_decrypt_into, aes_256_cbc_encrypt_into};

/// Kinds of media, as far as their keys and upload paths differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaKind {
    Image,
    Video,
    Audio,
    Document,
}

impl MediaKind {
    fn info(self) -> &'static [u8] {
        match self {
            Self::Image => b"WhatsApp Image Keys",
            Self::Video => b"WhatsApp Video Keys",
            Self::Audio => b"WhatsApp Audio Keys",
            Self::Document => b"WhatsApp Document Keys",
        }
    }

    /// The path segment of uploads (`/mms/<type>/…`).
    pub fn mms_type(self) -> &'static str {
        match self {
            Self::Image => "image",
            Self::Video => "video",
            Self::Audio => "audio",
            Self::Document => "document",
        }
    }

    pub fn from_mms_type(s: &str) -> Option<Self> {
        match s {
            "image" => Some(Self::Image),
            "video" => Some(Self::Video),
            "audio" => Some(Self::Audio),
            "document" => Some(Self::Document),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        self.mms_type()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MediaError {
    #[error("blob is too short to carry a MAC")]
    TooShort,
    #[error("encrypted SHA-256 does not match the message")]
    EncHashMismatch,
    #[error("MAC does not verify")]
    BadMac,
    #[error("ciphertext does not decrypt")]
    BadCiphertext,
    #[error("plaintext SHA-256 does not match the message")]
    HashMismatch,
    #[error("plaintext length {got} differs from the message's {expected}")]
    LengthMismatch { expected: u64, got: u64 },
    #[error("media key is not 32 bytes")]
    BadKey,
}

struct Keys {
    iv: [u8; 16],
    cipher: [u8; 32],
    mac: [u8; 32],
}

fn expand(media_key: &[u8], kind: MediaKind) -> Result<Keys, MediaError> {
    if media_key.len() != 32 {
        return Err(MediaError::BadKey);
    }
    let mut okm = [0u8; 112];
    Hkdf::<Sha256>::new(None, media_key)
        .expand(kind.info(), &mut okm)
        .map_err(|_| MediaError::BadKey)?;
    let mut k = Keys {
        iv: [0; 16],
        cipher: [0; 32],
        mac: [0; 32],
    };
    k.iv.copy_from_slice(&okm[..16]);
    k.cipher.copy_from_slice(&okm[16..48]);
    k.mac.copy_from_slice(&okm[48..80]);
    Ok(k)
}

fn mac10(keys: &Keys, ciphertext: &[u8]) -> Result<[u8; 10], MediaError> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&keys.mac).map_err(|_| MediaError::BadKey)?;
    mac.update(&keys.iv);
    mac.update(ciphertext);
    let full = mac.finalize().into_bytes();
    let mut out = [0u8; 10];
    out.copy_from_slice(&full[..10]);
    Ok(out)
}

/// An encrypted upload and what the message must carry to open it.
pub struct Sealed {
    pub blob: Vec<u8>,
    pub media_key: [u8; 32],
    pub file_sha256: [u8; 32],
    pub file_enc_sha256: [u8; 32],
}

pub fn seal(plaintext: &[u8], kind: MediaKind) -> Result<Sealed, MediaError> {
    let media_key: [u8; 32] = rand::rng().random();
    let keys = expand(&media_key, kind)?;
    let mut blob = Vec::with_capacity(plaintext.len() + 32);
    aes_256_cbc_encrypt_into(plaintext, &keys.cipher, &keys.iv, &mut blob).map_err(|_| MediaError::BadCiphertext)?;
    let mac = mac10(&keys, &blob)?;
    blob.extend_from_slice(&mac);
    Ok(Sealed {
        file_enc_sha256: Sha256::digest(&blob).into(),
        file_sha256: Sha256::digest(plaintext).into(),
        media_key,
        blob,
    })
}

/// What a media message says about its blob.
pub struct Expected<'a> {
    pub media_key: &'a [u8],
    pub file_enc_sha256: Option<&'a [u8]>,
    pub file_sha256: Option<&'a [u8]>,
    pub file_length: Option<u64>,
}

/// Checks every hash and the MAC, then decrypts.
pub fn open(blob: &[u8], kind: MediaKind, expected: &Expected<'_>) -> Result<Vec<u8>, MediaError> {
    if blob.len() < 10 + 16 {
        return Err(MediaError::TooShort);
    }
    if let Some(h) = expected.file_enc_sha256
        && Sha256::digest(blob).as_slice() != h
    {
        return Err(MediaError::EncHashMismatch);
    }
    let keys = expand(expected.media_key, kind)?;
    let (ciphertext, mac) = blob.split_at(blob.len() - 10);
    if mac10(&keys, ciphertext)? != mac {
        return Err(MediaError::BadMac);
    }
    let mut plain = Vec::with_capacity(ciphertext.len());
    aes_256_cbc_decrypt_into(ciphertext, &keys.cipher, &keys.iv, &mut plain).map_err(|_| MediaError::BadCiphertext)?;
    if let Some(h) = expected.file_sha256
        && Sha256::digest(&plain).as_slice() != h
    {
        return Err(MediaError::HashMismatch);
    }
    if let Some(len) = expected.file_length
        && len != plain.len() as u64
    {
        return Err(MediaError::LengthMismatch {
            expected: len,
            got: plain.len() as u64,
        });
    }
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_tamper_checks() {
        let data = b"\x89PNG\r\n\x1a\n some picture bytes".to_vec();
        let s = seal(&data, MediaKind::Image).unwrap();
        let exp = Expected {
            media_key: &s.media_key,
            file_enc_sha256: Some(&s.file_enc_sha256),
            file_sha256: Some(&s.file_sha256),
            file_length: Some(data.len() as u64),
        };
        assert_eq!(open(&s.blob, MediaKind::Image, &exp).unwrap(), data);
        // The keys are per kind: an image blob does not open as a document.
        let no_hashes = Expected {
            file_enc_sha256: None,
            ..exp
        };
        assert_eq!(open(&s.blob, MediaKind::Document, &no_hashes), Err(MediaError::BadMac));
        let mut tampered = s.blob.clone();
        tampered[3] ^= 1;
        assert_eq!(open(&tampered, MediaKind::Image, &exp), Err(MediaError::EncHashMismatch));
        assert_eq!(open(&tampered, MediaKind::Image, &no_hashes), Err(MediaError::BadMac));
        assert_eq!(open(&s.blob[..20], MediaKind::Image, &exp), Err(MediaError::TooShort));
    }
}
