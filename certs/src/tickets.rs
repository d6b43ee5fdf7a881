//! Session ticket keys in Envoy's format, for stateless resumption shared across processes.
//!
//! Envoy's keys are 80 bytes: a 16-byte key name, a 32-byte HMAC secret and a 32-byte AES
//! key, used by BoringSSL for RFC 5077 tickets (AES-256-CBC + HMAC-SHA256). A rustls ticket
//! wraps rustls's own session state, which BoringSSL cannot read anyway, so byte-for-byte
//! compatibility with Envoy's tickets is neither possible nor useful. What matters is the
//! operational contract: every Sluice instance given the same keys can resume each other's
//! sessions, the first key encrypts, all keys decrypt (so keys can be rotated by prepending),
//! and a ticket is bound to the key name it was issued under.
//!
//! Construction: AES-256-GCM (ring) with a key derived by HKDF-SHA256 from all 64 secret bytes
//! (salt: a fixed label, info: the key name), a random 96-bit nonce per ticket, and the key
//! name as associated data. Ticket = name (16) || nonce (12) || ciphertext || tag (16).

use std::sync::Arc;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use rustls::crypto::CryptoProvider;
use rustls::server::ProducesTickets;
use sluice_config::model::{Secret, SessionTickets};

use crate::error::CertError;
use crate::slot::{Material, Slot};
use crate::source::{InputRecorder, secret_kind};
use crate::status::MaterialStatus;

const KEY_LEN: usize = 80;
const NAME_LEN: usize = 16;
const TAG_LEN: usize = 16;
const HKDF_SALT: &[u8] = b"sluice session ticket key v1";
/// Ticket lifetime hint. Envoy's default session timeout is 2 hours; statically configured
/// keys do not rotate by themselves, so the hint is what bounds a ticket's usefulness.
const LIFETIME_SECS: u32 = 7200;

pub(crate) struct TicketKeys {
    keys: Vec<TicketKey>,
}

struct TicketKey {
    name: [u8; NAME_LEN],
    aead: LessSafeKey,
}

impl std::fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("TicketKeys").field("keys", &self.keys.len()).finish()
    }
}

impl TicketKeys {
    pub(crate) fn from_raw(what: &str, raw: &[Vec<u8>]) -> Result<TicketKeys, CertError> {
        if raw.is_empty() {
            return Err(CertError::NoTicketKeys { what: what.to_string() });
        }
        let mut keys = Vec::with_capacity(raw.len());
        for (index, bytes) in raw.iter().enumerate() {
            if bytes.len() != KEY_LEN {
                return Err(CertError::BadTicketKey { what: what.to_string(), index, len: bytes.len() });
            }
            let (name_bytes, secret) = bytes.split_at(NAME_LEN);
            let mut name = [0u8; NAME_LEN];
            name.copy_from_slice(name_bytes);
            let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, HKDF_SALT).extract(secret);
            let info = [name_bytes];
            let okm = prk.expand(&info, &AES_256_GCM).map_err(|_| CertError::Verifier {
                what: what.to_string(),
                detail: "session ticket key derivation failed".into(),
            })?;
            keys.push(TicketKey { name, aead: LessSafeKey::new(UnboundKey::from(okm)) });
        }
        Ok(TicketKeys { keys })
    }

    fn encrypt(&self, rng: &SystemRandom, plain: &[u8]) -> Option<Vec<u8>> {
        let key = self.keys.first()?;
        let mut nonce = [0u8; NONCE_LEN];
        rng.fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(NAME_LEN + NONCE_LEN + plain.len() + TAG_LEN);
        out.extend_from_slice(&key.name);
        out.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        key.aead.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(&key.name), &mut body).ok()?;
        out.extend_from_slice(&body);
        Some(out)
    }

    fn decrypt(&self, ticket: &[u8]) -> Option<Vec<u8>> {
        if ticket.len() < NAME_LEN + NONCE_LEN + TAG_LEN {
            return None;
        }
        let (name, rest) = ticket.split_at(NAME_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let key = self.keys.iter().find(|k| k.name == name)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut body = sealed.to_vec();
        let plain_len = key.aead.open_in_place(nonce, Aad::from(&key.name), &mut body).ok()?.len();
        body.truncate(plain_len);
        Some(body)
    }
}

impl Material for TicketKeys {
    type Spec = SessionTickets;
    const KIND: &'static str = "session_ticket_keys";

    fn name(spec: &SessionTickets) -> String {
        match spec {
            SessionTickets::Sds(name) => name.clone(),
            SessionTickets::Inline(keys) => format!("{} inline key(s)", keys.len()),
        }
    }

    fn source(spec: &SessionTickets) -> String {
        match spec {
            SessionTickets::Sds(_) => "sds".to_string(),
            SessionTickets::Inline(_) => "inline".to_string(),
        }
    }

    fn load(
        spec: &SessionTickets,
        rec: &mut InputRecorder<'_>,
        _provider: &Arc<CryptoProvider>,
    ) -> Result<Self, CertError> {
        let what = format!("session ticket keys {}", Self::name(spec));
        let sources = match spec {
            SessionTickets::Inline(keys) => keys.clone(),
            SessionTickets::Sds(name) => match &*rec.secret(name, &what)? {
                Secret::SessionTicketKeys(keys) => keys.clone(),
                other => {
                    return Err(CertError::WrongSecretKind {
                        what,
                        name: name.clone(),
                        actual: secret_kind(other),
                        expected: "session_ticket_keys",
                    });
                }
            },
        };
        let raw = sources.iter().map(|ds| rec.read(ds, &what)).collect::<Result<Vec<_>, _>>()?;
        TicketKeys::from_raw(&what, &raw)
    }

    fn status(&self, name: &str, source: &str) -> Vec<MaterialStatus> {
        vec![MaterialStatus {
            kind: Self::KIND,
            name: name.to_string(),
            source: source.to_string(),
            subject: None,
            sans: Vec::new(),
            not_after: None,
            last_error: None,
        }]
    }
}

/// A `ProducesTickets` that reads the live key set on every ticket, so a key rotation
/// (file or SDS) applies to the next ticket issued or redeemed.
#[derive(Debug)]
pub(crate) struct LiveTickets {
    slot: Arc<Slot<TicketKeys>>,
    rng: SystemRandom,
}

impl LiveTickets {
    pub(crate) fn new(slot: Arc<Slot<TicketKeys>>) -> Self {
        LiveTickets { slot, rng: SystemRandom::new() }
    }
}

impl ProducesTickets for LiveTickets {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        LIFETIME_SECS
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.slot.current().encrypt(&self.rng, plain)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.slot.current().decrypt(cipher)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> Vec<u8> {
        (0..KEY_LEN).map(|i| seed.wrapping_add(i as u8)).collect()
    }

    #[test]
    fn round_trip_and_rotation() {
        let rng = SystemRandom::new();
        let old = TicketKeys::from_raw("t", &[key(1)]).unwrap();
        let ticket = old.encrypt(&rng, b"session state").unwrap();
        assert_eq!(old.decrypt(&ticket).unwrap(), b"session state");

        // A new primary key prepended: old tickets still decrypt, new ones use the new name.
        let rotated = TicketKeys::from_raw("t", &[key(2), key(1)]).unwrap();
        assert_eq!(rotated.decrypt(&ticket).unwrap(), b"session state");
        let fresh = rotated.encrypt(&rng, b"x").unwrap();
        assert_eq!(&fresh[..NAME_LEN], &key(2)[..NAME_LEN]);
        // The old key set cannot read tickets of a key it does not have.
        assert!(old.decrypt(&fresh).is_none());
    }

    #[test]
    fn tampering_is_detected() {
        let rng = SystemRandom::new();
        let keys = TicketKeys::from_raw("t", &[key(7)]).unwrap();
        let mut ticket = keys.encrypt(&rng, b"state").unwrap();
        let last = ticket.len() - 1;
        ticket[last] ^= 1;
        assert!(keys.decrypt(&ticket).is_none());
        assert!(keys.decrypt(&ticket[..10]).is_none());
    }

    #[test]
    fn wrong_length_is_named() {
        let err = TicketKeys::from_raw("session ticket keys k", &[key(1), vec![0; 48]]).unwrap_err();
        assert_eq!(err.to_string(), "session ticket keys k: session ticket key 1 is 48 bytes, expected 80");
    }
}
