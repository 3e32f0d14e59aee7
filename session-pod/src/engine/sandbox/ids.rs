//! Identifiers that look like WhatsApp's, so integrators' parsers and column sizes meet the
//! real shapes in the sandbox already.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rand::Rng;

/// Characters of WhatsApp pair codes: digits and capitals without the look-alikes 0, O, I, U.
const PAIR_CODE_ALPHABET: &[u8] = b"123456789ABCDEFGHJKLMNPQRSTVWXYZ";

/// An outgoing message id as WhatsApp Web makes them: `3EB0` and 18 uppercase hex digits.
pub fn outgoing_message_id(rng: &mut impl Rng) -> String {
    format!("3EB0{}", upper_hex(rng, 9))
}

/// An inbound message id as phones make them: `3A` and 18 uppercase hex digits.
pub fn inbound_message_id(rng: &mut impl Rng) -> String {
    format!("3A{}", upper_hex(rng, 9))
}

/// Eight characters to type on the phone (shown to people as `ABCD-EFGH`).
pub fn pair_code(rng: &mut impl Rng) -> String {
    (0..8)
        .map(|_| char::from(PAIR_CODE_ALPHABET[rng.random_range(0..PAIR_CODE_ALPHABET.len())]))
        .collect()
}

/// The keys a companion shows in its QR code; fixed for one pairing attempt.
#[derive(Debug, Clone)]
pub struct QrKeys {
    noise_public: String,
    identity_public: String,
    adv_secret: String,
}

impl QrKeys {
    pub fn generate(rng: &mut impl Rng) -> Self {
        let key = |rng: &mut dyn rand::RngCore| {
            let mut b = [0u8; 32];
            rng.fill_bytes(&mut b);
            STANDARD.encode(b)
        };
        Self {
            noise_public: key(rng),
            identity_public: key(rng),
            adv_secret: key(rng),
        }
    }

    /// `ref,noise-key,identity-key,adv-secret`, as WhatsApp Web encodes its QR codes; the
    /// ref (`2@` and random base64) changes with every rotation.
    pub fn qr_text(&self, rng: &mut impl Rng) -> String {
        let mut r = [0u8; 66];
        rng.fill_bytes(&mut r);
        format!(
            "2@{},{},{},{}",
            STANDARD.encode(r),
            self.noise_public,
            self.identity_public,
            self.adv_secret
        )
    }
}

fn upper_hex(rng: &mut impl Rng, bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rng.fill_bytes(&mut b);
    hex::encode_upper(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_upper_hex(s: &str) -> bool {
        s.bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
    }

    #[test]
    fn message_ids() {
        let mut rng = rand::rng();
        for _ in 0..100 {
            let id = outgoing_message_id(&mut rng);
            assert_eq!(id.len(), 22, "{id}");
            assert!(id.starts_with("3EB0") && is_upper_hex(&id[4..]), "{id}");
            let id = inbound_message_id(&mut rng);
            assert_eq!(id.len(), 20, "{id}");
            assert!(id.starts_with("3A") && is_upper_hex(&id[2..]), "{id}");
        }
        assert_ne!(outgoing_message_id(&mut rng), outgoing_message_id(&mut rng));
    }

    #[test]
    fn pair_codes() {
        let mut rng = rand::rng();
        for _ in 0..100 {
            let c = pair_code(&mut rng);
            assert_eq!(c.len(), 8);
            assert!(c.bytes().all(|b| PAIR_CODE_ALPHABET.contains(&b)), "{c}");
            assert!(!c.contains(['0', 'O', 'I', 'U']));
        }
    }

    #[test]
    fn qr_text_shape() {
        let mut rng = rand::rng();
        let keys = QrKeys::generate(&mut rng);
        let a = keys.qr_text(&mut rng);
        let b = keys.qr_text(&mut rng);
        let parts: Vec<&str> = a.split(',').collect();
        assert_eq!(parts.len(), 4, "{a}");
        assert!(parts[0].starts_with("2@"));
        for key in &parts[1..] {
            assert_eq!(STANDARD.decode(key).unwrap().len(), 32);
        }
        // Rotation changes the ref only.
        assert_ne!(a.split(',').next(), b.split(',').next());
        assert_eq!(
            a.split(',').skip(1).collect::<Vec<_>>(),
            b.split(',').skip(1).collect::<Vec<_>>()
        );
        // It fits a QR code comfortably.
        assert!(crate::qr::QrMatrix::encode(&a).is_ok());
    }
}
