//! The server side of WhatsApp's transport: the connection intro, the 3-byte frame header,
//! the Noise XX handshake as responder, and the encrypted frames after it.
//!
//! The handshake follows `Noise_XX_25519_AESGCM_SHA256` with the WhatsApp connection header
//! as prologue. The server proves its static key with a certificate chain; real clients check
//! it against WhatsApp's root key, wa-rs 0.2 only checks its structure (issuer serials, key
//! sizes, leaf key = static key), so a chain signed by our own test root passes.

use prost::Message as _;
use rand::Rng;
use wa_rs_binary::consts::{NOISE_START_PATTERN, WA_CONN_HEADER};
use wa_rs_libsignal::protocol::{KeyPair, PublicKey};
use wa_rs_noise::{NoiseCipher, NoiseState};
use wa_rs_proto::whatsapp::cert_chain::{NoiseCertificate, noise_certificate};
use wa_rs_proto::whatsapp::{CertChain, ClientPayload, HandshakeMessage, handshake_message};

/// Largest frame payload the 3-byte length can describe.
pub const MAX_FRAME: usize = 0xFF_FFFF;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("connection intro is not WhatsApp's (got {0:02x?})")]
    BadIntro(Vec<u8>),
    #[error("frame of {0} bytes is larger than the limit")]
    FrameTooLarge(usize),
    #[error("handshake message is malformed: {0}")]
    Malformed(&'static str),
    #[error("protobuf: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("noise: {0}")]
    Noise(String),
    #[error("bad key: {0}")]
    Key(String),
}

type Result<T> = std::result::Result<T, TransportError>;

/// The server's long-term identity: its Noise static key and the chain that certifies it.
pub struct ServerIdentity {
    pub static_key: KeyPair,
    /// Encoded [`CertChain`] (intermediate signed by the test root, leaf = static key).
    pub cert_chain: Vec<u8>,
}

impl ServerIdentity {
    /// A fresh identity with a chain rooted in a key made up for this emulator.
    pub fn generate() -> Self {
        let mut rng = rand::rng();
        let root = KeyPair::generate(&mut rng);
        let intermediate = KeyPair::generate(&mut rng);
        let static_key = KeyPair::generate(&mut rng);
        let now = chrono::Utc::now().timestamp() as u64;
        let intermediate_serial: u32 = rng.random_range(1..u32::MAX);
        let cert = |serial: u32, issuer: u32, key: &PublicKey, signer: &KeyPair| {
            let details = noise_certificate::Details {
                serial: Some(serial),
                // WhatsApp's root has serial 0; the client insists on it.
                issuer_serial: Some(issuer),
                key: Some(key.public_key_bytes().to_vec()),
                not_before: Some(now - 60),
                not_after: Some(now + 30 * 24 * 3600),
            }
            .encode_to_vec();
            let signature = signer
                .private_key
                .calculate_signature(&details, &mut rand::rng())
                .map(|s| s.to_vec())
                .unwrap_or_default();
            NoiseCertificate {
                details: Some(details),
                signature: Some(signature),
            }
        };
        let chain = CertChain {
            intermediate: Some(cert(intermediate_serial, 0, &intermediate.public_key, &root)),
            leaf: Some(cert(
                intermediate_serial.wrapping_add(1),
                intermediate_serial,
                &static_key.public_key,
                &intermediate,
            )),
        };
        Self {
            static_key,
            cert_chain: chain.encode_to_vec(),
        }
    }
}

/// Collects bytes from the socket and cuts them into frames. The first bytes of a connection
/// are the intro (optional edge-routing pre-intro, then `WA` + magic + dictionary version).
#[derive(Default)]
pub struct FrameReader {
    buf: Vec<u8>,
    intro_seen: bool,
}

impl FrameReader {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn feed(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete frame, `Ok(None)` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>> {
        if !self.intro_seen {
            let mut at = 0;
            if self.buf.starts_with(b"ED") {
                // Edge-routing pre-intro: "ED" 0 1, a 3-byte length, the routing bytes.
                if self.buf.len() < 7 {
                    return Ok(None);
                }
                let len = u24(&self.buf[4..7]);
                at = 7 + len;
            }
            if self.buf.len() < at + 4 {
                return Ok(None);
            }
            let header = &self.buf[at..at + 4];
            // The dictionary version may move; the "WA" + magic part may not.
            if header[..3] != WA_CONN_HEADER[..3] {
                return Err(TransportError::BadIntro(header.to_vec()));
            }
            self.buf.drain(..at + 4);
            self.intro_seen = true;
        }
        if self.buf.len() < 3 {
            return Ok(None);
        }
        let len = u24(&self.buf[..3]);
        if self.buf.len() < 3 + len {
            return Ok(None);
        }
        let frame = self.buf[3..3 + len].to_vec();
        self.buf.drain(..3 + len);
        Ok(Some(frame))
    }
}

fn u24(b: &[u8]) -> usize {
    (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2])
}

/// Prefixes a payload with its 3-byte length.
pub fn frame(payload: &[u8]) -> Result<Vec<u8>> {
    if payload.len() > MAX_FRAME {
        return Err(TransportError::FrameTooLarge(payload.len()));
    }
    let mut out = Vec::with_capacity(payload.len() + 3);
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.extend_from_slice(payload);
    Ok(out)
}

fn noise_err(e: impl std::fmt::Display) -> TransportError {
    TransportError::Noise(e.to_string())
}

/// The responder half of the XX handshake, between ClientHello and ClientFinish.
pub struct Responder {
    noise: NoiseState,
    ephemeral: KeyPair,
}

/// What the handshake established.
pub struct Established {
    pub client_static: [u8; 32],
    pub payload: ClientPayload,
    pub transport: TransportCipher,
}

impl Responder {
    /// Reads the ClientHello frame and answers with the ServerHello frame payload.
    pub fn respond(identity: &ServerIdentity, client_hello_frame: &[u8]) -> Result<(Self, Vec<u8>)> {
        let hello = HandshakeMessage::decode(client_hello_frame)?
            .client_hello
            .ok_or(TransportError::Malformed("no client_hello"))?;
        let client_ephemeral = hello
            .ephemeral
            .filter(|e| e.len() == 32)
            .ok_or(TransportError::Malformed("client ephemeral key is not 32 bytes"))?;
        let client_ephemeral = PublicKey::from_djb_public_key_bytes(&client_ephemeral)
            .map_err(|e| TransportError::Key(e.to_string()))?;

        let mut noise = NoiseState::new(NOISE_START_PATTERN.as_bytes(), &WA_CONN_HEADER).map_err(noise_err)?;
        noise.authenticate(client_ephemeral.public_key_bytes());
        let ephemeral = KeyPair::generate(&mut rand::rng());
        noise.authenticate(ephemeral.public_key.public_key_bytes());
        noise
            .mix_key(&agree(&ephemeral, &client_ephemeral)?)
            .map_err(noise_err)?;
        let static_ct = noise
            .encrypt(identity.static_key.public_key.public_key_bytes())
            .map_err(noise_err)?;
        noise
            .mix_key(&agree(&identity.static_key, &client_ephemeral)?)
            .map_err(noise_err)?;
        let cert_ct = noise.encrypt(&identity.cert_chain).map_err(noise_err)?;
        let server_hello = HandshakeMessage {
            server_hello: Some(handshake_message::ServerHello {
                ephemeral: Some(ephemeral.public_key.public_key_bytes().to_vec()),
                r#static: Some(static_ct),
                payload: Some(cert_ct),
                extended_static: None,
            }),
            ..Default::default()
        };
        Ok((Self { noise, ephemeral }, server_hello.encode_to_vec()))
    }

    /// Reads the ClientFinish frame: the client's static key and its login or registration
    /// payload. After this both sides switch to the transport keys.
    pub fn finish(mut self, client_finish_frame: &[u8]) -> Result<Established> {
        let finish = HandshakeMessage::decode(client_finish_frame)?
            .client_finish
            .ok_or(TransportError::Malformed("no client_finish"))?;
        let static_ct = finish.r#static.ok_or(TransportError::Malformed("no static key"))?;
        let payload_ct = finish.payload.ok_or(TransportError::Malformed("no payload"))?;
        let client_static: [u8; 32] = self
            .noise
            .decrypt(&static_ct)
            .map_err(noise_err)?
            .try_into()
            .map_err(|_| TransportError::Malformed("client static key is not 32 bytes"))?;
        let client_static_key =
            PublicKey::from_djb_public_key_bytes(&client_static).map_err(|e| TransportError::Key(e.to_string()))?;
        self.noise
            .mix_key(&agree(&self.ephemeral, &client_static_key)?)
            .map_err(noise_err)?;
        let payload = self.noise.decrypt(&payload_ct).map_err(noise_err)?;
        let payload = ClientPayload::decode(payload.as_slice())?;
        let keys = self.noise.split().map_err(noise_err)?;
        Ok(Established {
            client_static,
            payload,
            // The split's first key is the initiator's sending key.
            transport: TransportCipher {
                read: keys.write,
                write: keys.read,
                read_counter: 0,
                write_counter: 0,
            },
        })
    }
}

fn agree(ours: &KeyPair, theirs: &PublicKey) -> Result<[u8; 32]> {
    ours.private_key
        .calculate_agreement(theirs)
        .map_err(|e| TransportError::Key(e.to_string()))
}

/// AES-256-GCM with a counter nonce per direction, as after every WhatsApp handshake.
pub struct TransportCipher {
    read: NoiseCipher,
    write: NoiseCipher,
    read_counter: u32,
    write_counter: u32,
}

impl TransportCipher {
    pub fn encrypt(&mut self, plaintext: &[u8]) -> Result<Vec<u8>> {
        let out = self
            .write
            .encrypt_with_counter(self.write_counter, plaintext)
            .map_err(noise_err)?;
        self.write_counter = self.write_counter.wrapping_add(1);
        Ok(out)
    }

    pub fn decrypt(&mut self, ciphertext: &[u8]) -> Result<Vec<u8>> {
        let out = self
            .read
            .decrypt_with_counter(self.read_counter, ciphertext)
            .map_err(noise_err)?;
        self.read_counter = self.read_counter.wrapping_add(1);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wa_rs_noise::HandshakeState;

    /// The responder interoperates with the initiator wa-rs uses, byte for byte.
    #[test]
    fn handshake_with_the_wa_rs_initiator() {
        let identity = ServerIdentity::generate();
        let client_static = KeyPair::generate(&mut rand::rng());
        let payload = ClientPayload {
            username: Some(15550000001),
            device: Some(3),
            ..Default::default()
        };
        let mut client = HandshakeState::new(
            client_static.clone(),
            payload.encode_to_vec(),
            NOISE_START_PATTERN,
            &WA_CONN_HEADER,
        )
        .unwrap();
        let hello = client.build_client_hello().unwrap();

        let (responder, server_hello) = Responder::respond(&identity, &hello).unwrap();
        let finish = client
            .read_server_hello_and_build_client_finish(&server_hello)
            .unwrap();
        let mut est = responder.finish(&finish).unwrap();
        assert_eq!(est.client_static, *client_static.public_key.public_key_bytes());
        assert_eq!(est.payload.username, Some(15550000001));
        assert_eq!(est.payload.device, Some(3));

        let (client_write, client_read) = client.finish().unwrap();
        let ct = client_write.encrypt_with_counter(0, b"from client").unwrap();
        assert_eq!(est.transport.decrypt(&ct).unwrap(), b"from client");
        let ct = est.transport.encrypt(b"from server").unwrap();
        assert_eq!(client_read.decrypt_with_counter(0, &ct).unwrap(), b"from server");
    }

    #[test]
    fn frames_are_cut_across_reads() {
        let mut r = FrameReader::new();
        let mut bytes = WA_CONN_HEADER.to_vec();
        bytes.extend(frame(b"abc").unwrap());
        bytes.extend(frame(b"defg").unwrap());
        r.feed(&bytes[..5]);
        assert_eq!(r.next_frame().unwrap(), None);
        r.feed(&bytes[5..]);
        assert_eq!(r.next_frame().unwrap(), Some(b"abc".to_vec()));
        assert_eq!(r.next_frame().unwrap(), Some(b"defg".to_vec()));
        assert_eq!(r.next_frame().unwrap(), None);
    }

    #[test]
    fn edge_routing_pre_intro_is_skipped() {
        let mut r = FrameReader::new();
        let mut bytes = b"ED\x00\x01\x00\x00\x02xy".to_vec();
        bytes.extend_from_slice(&WA_CONN_HEADER);
        bytes.extend(frame(b"z").unwrap());
        r.feed(&bytes);
        assert_eq!(r.next_frame().unwrap(), Some(b"z".to_vec()));
    }

    #[test]
    fn a_foreign_intro_is_refused() {
        let mut r = FrameReader::new();
        r.feed(b"GET / HTTP/1.1\r\n");
        assert!(matches!(r.next_frame(), Err(TransportError::BadIntro(_))));
    }
}
