//! The TLS record layer of an established connection, run by tidemark itself with the
//! AEADs of rustls' crypto provider (`ring`): one independent state per direction, so the
//! request reader opens records while reply writers seal theirs, without a shared lock,
//! sealing in place in the output buffer (no per-record allocation, no staging copy).
//!
//! rustls runs the handshake; afterwards [`Secrets`] takes the traffic keys and sequence
//! numbers out of it (`dangerous_extract_secrets`) and, for TLS 1.3, the traffic secrets
//! its key log reports (needed to follow KeyUpdates: RFC 8446 section 7.2). Both TLS 1.3
//! and TLS 1.2 with AES-GCM or ChaCha20-Poly1305 are supported.
//!
//! What arrives after the handshake and is not application data: a KeyUpdate (TLS 1.3)
//! renews the receiving key and, when the peer asks for it, the caller answers with its
//! own before its next record ([`Opened::KeyUpdate`]); close_notify ends the stream; any
//! other alert, handshake message or content type, a record over the size limit or one
//! that fails authentication is an error naming the TLS alert to send back.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use ring::aead;
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets, SupportedCipherSuite};
use zeroize::{Zeroize, Zeroizing};

/// Plaintext bytes in one record (2^14, RFC 8446 section 5.1).
pub(crate) const MAX_FRAGMENT: usize = 16 * 1024;
/// The record header: type, legacy version, length.
pub(crate) const HEADER: usize = 5;
const TAG: usize = 16;
/// TLS 1.2 AES-GCM records carry an explicit 8-byte nonce.
const EXPLICIT_NONCE: usize = 8;
/// The largest record body a peer may send: TLS 1.3 allows 2^14 + 256, TLS 1.2 2^14 + 2048.
const MAX_BODY_TLS13: usize = MAX_FRAGMENT + 256;
const MAX_BODY_TLS12: usize = MAX_FRAGMENT + 2048;
/// The largest whole record either version accepts.
pub(crate) const MAX_RECORD: usize = HEADER + MAX_BODY_TLS12;

const CHANGE_CIPHER_SPEC: u8 = 20;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const APPLICATION_DATA: u8 = 23;
const KEY_UPDATE: u8 = 24;

/// TLS alert descriptions this layer sends (RFC 8446 section 6).
pub(crate) mod alert {
    pub(crate) const CLOSE_NOTIFY: u8 = 0;
    pub(crate) const UNEXPECTED_MESSAGE: u8 = 10;
    pub(crate) const BAD_RECORD_MAC: u8 = 20;
    pub(crate) const RECORD_OVERFLOW: u8 = 22;
    pub(crate) const DECODE_ERROR: u8 = 50;
    pub(crate) const PROTOCOL_VERSION: u8 = 70;
    pub(crate) const INTERNAL_ERROR: u8 = 80;
    pub(crate) const NO_RENEGOTIATION: u8 = 100;
}

/// A record-layer failure: what went wrong and the alert that tells the peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub(crate) struct RecordError {
    /// The TLS alert description to send before closing.
    pub(crate) alert: u8,
    /// What failed, for the log.
    pub(crate) message: String,
}

fn fail(alert: u8, message: impl Into<String>) -> RecordError {
    RecordError {
        alert,
        message: message.into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    Tls12,
    Tls13,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cipher {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

impl Cipher {
    fn algorithm(self) -> &'static aead::Algorithm {
        match self {
            Cipher::Aes128Gcm => &aead::AES_128_GCM,
            Cipher::Aes256Gcm => &aead::AES_256_GCM,
            Cipher::Chacha20Poly1305 => &aead::CHACHA20_POLY1305,
        }
    }

    fn key_len(self) -> usize {
        self.algorithm().key_len()
    }
}

/// One direction's keys and sequence number.
struct Direction {
    version: Version,
    cipher: Cipher,
    key: aead::LessSafeKey,
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
    /// TLS 1.3: the current traffic secret, from which KeyUpdate derives the next one
    /// (wiped when replaced or dropped).
    secret: Option<Zeroizing<Vec<u8>>>,
    /// Records one key may protect (the suite's confidentiality limit).
    limit: u64,
}

impl Direction {
    fn new(
        version: Version,
        secrets: (u64, ConnectionTrafficSecrets),
        secret: Option<Zeroizing<Vec<u8>>>,
        limit: u64,
    ) -> Result<Direction, RecordError> {
        let (seq, secrets) = secrets;
        let (cipher, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Cipher::Aes128Gcm, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Cipher::Aes256Gcm, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (Cipher::Chacha20Poly1305, key, iv)
            }
            _ => {
                return Err(fail(
                    alert::INTERNAL_ERROR,
                    "the negotiated TLS cipher suite has no record layer here",
                ))
            }
        };
        let iv: [u8; aead::NONCE_LEN] = iv
            .as_ref()
            .try_into()
            .map_err(|_| fail(alert::INTERNAL_ERROR, "TLS IV of an unexpected length"))?;
        if let Some(secret) = &secret {
            // The key log's secret must be the one these keys came from.
            let (derived_key, derived_iv) = traffic_keys(secret, cipher)?;
            if derived_key[..] != *key.as_ref() || derived_iv != iv {
                return Err(fail(
                    alert::INTERNAL_ERROR,
                    "the TLS traffic secret from the key log does not match the session's keys",
                ));
            }
        }
        Ok(Direction {
            version,
            cipher,
            key: make_key(cipher, key.as_ref())?,
            iv,
            seq,
            secret,
            limit,
        })
    }

    /// The per-record nonce: the IV xor the sequence number (TLS 1.3, TLS 1.2 ChaCha20,
    /// and rustls' choice of explicit nonce for TLS 1.2 AES-GCM).
    fn nonce(&self) -> [u8; aead::NONCE_LEN] {
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        nonce
    }

    fn next_seq(&mut self) -> Result<(), RecordError> {
        self.seq = self
            .seq
            .checked_add(1)
            .ok_or_else(|| fail(alert::INTERNAL_ERROR, "TLS sequence number exhausted"))?;
        Ok(())
    }

    /// RFC 8446 section 7.2: the next traffic secret and its key and IV.
    fn update(&mut self) -> Result<(), RecordError> {
        let secret = self.secret.as_ref().ok_or_else(|| {
            fail(
                alert::UNEXPECTED_MESSAGE,
                "a KeyUpdate on a connection that is not TLS 1.3",
            )
        })?;
        let next = expand_label(secret, b"traffic upd", secret.len())?;
        let (key, iv) = traffic_keys(&next, self.cipher)?;
        self.key = make_key(self.cipher, &key)?;
        self.iv = iv;
        self.seq = 0;
        self.secret = Some(next);
        Ok(())
    }
}

impl Drop for Direction {
    fn drop(&mut self) {
        // The traffic secret wipes itself; ring's key schedule cannot be reached.
        self.iv.zeroize();
    }
}

fn make_key(cipher: Cipher, key: &[u8]) -> Result<aead::LessSafeKey, RecordError> {
    aead::UnboundKey::new(cipher.algorithm(), key)
        .map(aead::LessSafeKey::new)
        .map_err(|_| fail(alert::INTERNAL_ERROR, "unusable TLS traffic key"))
}

struct Len(usize);

impl ring::hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// HKDF-Expand-Label(secret, label, "", len) (RFC 8446 section 7.1), with the hash the
/// secret's length names (SHA-256: 32 bytes, SHA-384: 48); wiped when dropped.
fn expand_label(
    secret: &[u8],
    label: &[u8],
    len: usize,
) -> Result<Zeroizing<Vec<u8>>, RecordError> {
    let hkdf = match secret.len() {
        32 => ring::hkdf::HKDF_SHA256,
        48 => ring::hkdf::HKDF_SHA384,
        other => {
            return Err(fail(
                alert::INTERNAL_ERROR,
                format!("a {other}-byte TLS traffic secret fits no supported hash"),
            ))
        }
    };
    let prk = ring::hkdf::Prk::new_less_safe(hkdf, secret);
    let out_len = (len as u16).to_be_bytes();
    let label_len = [(6 + label.len()) as u8];
    let info: [&[u8]; 5] = [&out_len, &label_len, b"tls13 ", label, &[0]];
    let mut out = Zeroizing::new(vec![0u8; len]);
    prk.expand(&info, Len(len))
        .and_then(|okm| okm.fill(&mut out[..]))
        .map_err(|_| fail(alert::INTERNAL_ERROR, "HKDF-Expand-Label failed"))?;
    Ok(out)
}

fn traffic_keys(
    secret: &[u8],
    cipher: Cipher,
) -> Result<(Zeroizing<Vec<u8>>, [u8; aead::NONCE_LEN]), RecordError> {
    let key = expand_label(secret, b"key", cipher.key_len())?;
    let iv = expand_label(secret, b"iv", aead::NONCE_LEN)?;
    let iv = iv[..]
        .try_into()
        .map_err(|_| fail(alert::INTERNAL_ERROR, "HKDF gave an IV of the wrong length"))?;
    Ok((key, iv))
}

/// The TLS 1.2 additional data: sequence number, type, version, plaintext length.
fn tls12_aad(seq: u64, typ: u8, len: usize) -> [u8; TLS12_AAD] {
    let mut aad = [0u8; TLS12_AAD];
    aad[..8].copy_from_slice(&seq.to_be_bytes());
    aad[8] = typ;
    aad[9..11].copy_from_slice(&[3, 3]);
    aad[11..].copy_from_slice(&(len as u16).to_be_bytes());
    aad
}

const TLS12_AAD: usize = 13;

/// A captured traffic secret, wiped when dropped.
type Captured = Mutex<Option<Zeroizing<Vec<u8>>>>;

/// TLS 1.3 traffic secrets as rustls' key log reports them, for one connection.
#[derive(Debug, Default)]
pub(crate) struct KeyCapture {
    client: Captured,
    server: Captured,
}

impl rustls::KeyLog for KeyCapture {
    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        let slot = match label {
            "CLIENT_TRAFFIC_SECRET_0" => &self.client,
            "SERVER_TRAFFIC_SECRET_0" => &self.server,
            _ => return,
        };
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(Zeroizing::new(secret.to_vec()));
    }

    fn will_log(&self, label: &str) -> bool {
        matches!(label, "CLIENT_TRAFFIC_SECRET_0" | "SERVER_TRAFFIC_SECRET_0")
    }
}

/// The two directions of an established connection, taken out of rustls.
pub(crate) struct Secrets {
    pub(crate) sealer: Sealer,
    pub(crate) opener: Opener,
}

impl Secrets {
    /// Take the record layer out of a server connection whose handshake is done and whose
    /// outgoing records are all written, with `capture` its config's key log.
    pub(crate) fn take(
        session: rustls::ServerConnection,
        capture: &KeyCapture,
    ) -> Result<Secrets, RecordError> {
        let suite = session
            .negotiated_cipher_suite()
            .ok_or_else(|| fail(alert::INTERNAL_ERROR, "no TLS cipher suite negotiated"))?;
        let (version, limit) = match suite {
            SupportedCipherSuite::Tls13(s) => (Version::Tls13, s.common.confidentiality_limit),
            SupportedCipherSuite::Tls12(s) => (Version::Tls12, s.common.confidentiality_limit),
        };
        #[allow(deprecated)]
        let extracted: ExtractedSecrets = session.dangerous_extract_secrets().map_err(|e| {
            fail(
                alert::INTERNAL_ERROR,
                format!("cannot take the TLS keys out of the session: {e}"),
            )
        })?;
        let (client, server) = match version {
            Version::Tls13 => {
                let take = |slot: &Captured| slot.lock().unwrap_or_else(|e| e.into_inner()).take();
                match (take(&capture.client), take(&capture.server)) {
                    (Some(c), Some(s)) => (Some(c), Some(s)),
                    _ => {
                        return Err(fail(
                            alert::INTERNAL_ERROR,
                            "the TLS 1.3 traffic secrets were not captured",
                        ))
                    }
                }
            }
            Version::Tls12 => (None, None),
        };
        Ok(Secrets {
            sealer: Sealer(Direction::new(version, extracted.tx, server, limit)?),
            opener: Opener(Direction::new(version, extracted.rx, client, limit)?),
        })
    }
}

/// Seals outgoing records.
///
/// Application data is sealed in place: the caller lays the plaintext out at
/// [`Sealer::plaintext_ranges`] of a buffer of [`Sealer::sealed_len`] bytes, then
/// [`Sealer::seal_laid_out`] fills in headers and tags around it, so the data is copied
/// (or read from a file) once, straight into the records that go to the socket.
pub(crate) struct Sealer(Direction);

impl Sealer {
    fn explicit_nonce(&self) -> usize {
        if self.0.version == Version::Tls12 && self.0.cipher != Cipher::Chacha20Poly1305 {
            EXPLICIT_NONCE
        } else {
            0
        }
    }

    /// The size of one record holding `len` plaintext bytes.
    fn record_size(&self, len: usize) -> usize {
        let inner_type = usize::from(self.0.version == Version::Tls13);
        HEADER + self.explicit_nonce() + len + inner_type + TAG
    }

    /// Bytes `len` bytes of application data take as records of up to 2^14 bytes.
    pub(crate) fn sealed_len(&self, len: usize) -> usize {
        let full = len / MAX_FRAGMENT;
        let rest = len % MAX_FRAGMENT;
        full * self.record_size(MAX_FRAGMENT) + if rest > 0 { self.record_size(rest) } else { 0 }
    }

    /// Where the plaintext of `len` bytes of application data goes, in stream order, in a
    /// buffer of [`Sealer::sealed_len`] bytes.
    pub(crate) fn plaintext_ranges(&self, len: usize) -> impl Iterator<Item = Range<usize>> {
        let stride = self.record_size(MAX_FRAGMENT);
        let skip = HEADER + self.explicit_nonce();
        (0..len.div_ceil(MAX_FRAGMENT)).map(move |i| {
            let start = i * stride + skip;
            start..start + MAX_FRAGMENT.min(len - i * MAX_FRAGMENT)
        })
    }

    /// Before sealing `len` more bytes of application data: when they would take the key
    /// past its confidentiality limit, append a KeyUpdate to `out` and switch to the next
    /// key (TLS 1.3), or fail (TLS 1.2, which cannot renew).
    pub(crate) fn renew_if_due(
        &mut self,
        len: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        let records = len.div_ceil(MAX_FRAGMENT) as u64;
        if self.0.seq.saturating_add(records) <= self.0.limit {
            return Ok(());
        }
        if self.0.version == Version::Tls12 {
            return Err(fail(
                alert::CLOSE_NOTIFY,
                "this TLS 1.2 connection reached its cipher's record limit; reconnect \
                 (TLS 1.3 renews its keys instead)",
            ));
        }
        self.key_update(false, out)
    }

    /// Seal in place the application data records laid out for `len` bytes at the start
    /// of `out` (their plaintext already at [`Sealer::plaintext_ranges`]).
    pub(crate) fn seal_laid_out(&mut self, out: &mut [u8], len: usize) -> Result<(), RecordError> {
        let stride = self.record_size(MAX_FRAGMENT);
        for i in 0..len.div_ceil(MAX_FRAGMENT) {
            let fragment = MAX_FRAGMENT.min(len - i * MAX_FRAGMENT);
            self.seal_in_place(APPLICATION_DATA, &mut out[i * stride..], fragment)?;
        }
        Ok(())
    }

    /// Append `data` (a short trailer) as application data records, renewing the key
    /// first when due.
    pub(crate) fn seal_data(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), RecordError> {
        self.renew_if_due(data.len(), out)?;
        for fragment in data.chunks(MAX_FRAGMENT) {
            self.seal(APPLICATION_DATA, fragment, out)?;
        }
        Ok(())
    }

    /// Append a TLS 1.3 KeyUpdate (asking the peer to update too, if `request`) and switch
    /// to the next key.
    pub(crate) fn key_update(
        &mut self,
        request: bool,
        out: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        self.seal(HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, u8::from(request)], out)?;
        self.0.update()
    }

    /// Append an alert: close_notify as a warning, any other as fatal.
    pub(crate) fn alert(&mut self, description: u8, out: &mut Vec<u8>) -> Result<(), RecordError> {
        let level = if description == alert::CLOSE_NOTIFY {
            1
        } else {
            2
        };
        self.seal(ALERT, &[level, description], out)
    }

    /// Append one record of content type `typ` holding `fragment` (at most 2^14 bytes).
    fn seal(&mut self, typ: u8, fragment: &[u8], out: &mut Vec<u8>) -> Result<(), RecordError> {
        let start = out.len();
        let at = start + HEADER + self.explicit_nonce();
        out.resize(start + self.record_size(fragment.len()), 0);
        out[at..at + fragment.len()].copy_from_slice(fragment);
        self.seal_in_place(typ, &mut out[start..], fragment.len())
    }

    /// Seal the record at the start of `record`, whose `len` plaintext bytes are in place
    /// after the header (and TLS 1.2 AES-GCM's explicit nonce).
    fn seal_in_place(&mut self, typ: u8, record: &mut [u8], len: usize) -> Result<(), RecordError> {
        let explicit = self.explicit_nonce();
        let size = self.record_size(len);
        let d = &mut self.0;
        let nonce = d.nonce();
        let outer = match d.version {
            Version::Tls13 => APPLICATION_DATA,
            Version::Tls12 => typ,
        };
        let body = (size - HEADER) as u16;
        record[..3].copy_from_slice(&[outer, 3, 3]);
        record[3..HEADER].copy_from_slice(&body.to_be_bytes());
        record[HEADER..HEADER + explicit].copy_from_slice(&nonce[aead::NONCE_LEN - explicit..]);
        let plain_at = HEADER + explicit;
        let mut aad = [0u8; TLS12_AAD];
        let (sealed_len, aad_len) = match d.version {
            Version::Tls13 => {
                record[plain_at + len] = typ;
                aad[..HEADER].copy_from_slice(&record[..HEADER]);
                (len + 1, HEADER)
            }
            Version::Tls12 => {
                aad = tls12_aad(d.seq, typ, len);
                (len, TLS12_AAD)
            }
        };
        let (sealed, tag_room) = record[plain_at..size].split_at_mut(sealed_len);
        let tag = d
            .key
            .seal_in_place_separate_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(&aad[..aad_len]),
                sealed,
            )
            .map_err(|_| fail(alert::INTERNAL_ERROR, "TLS record encryption failed"))?;
        tag_room.copy_from_slice(tag.as_ref());
        d.next_seq()
    }
}

/// What one opened record held.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Opened {
    /// Application data, at this range of the record buffer (possibly empty).
    Data(Range<usize>),
    /// The peer renewed its key (already followed); `requested`: it asks us to renew ours
    /// ([`Sealer::key_update`]) before our next record.
    KeyUpdate { requested: bool },
    /// The peer closed its side (close_notify).
    Closed,
    /// A TLS 1.2 warning alert other than close_notify (ignored, as rustls does).
    Warning,
}

/// The length of the record at the start of `buf` (header included), once its header is
/// there; an error when the header is not a TLS record's or announces more than the record
/// size limit.
pub(crate) fn record_len(buf: &[u8]) -> Result<Option<usize>, RecordError> {
    if buf.len() < HEADER {
        return Ok(None);
    }
    if buf[1] != 3 || !(CHANGE_CIPHER_SPEC..=APPLICATION_DATA).contains(&buf[0]) {
        return Err(fail(
            alert::UNEXPECTED_MESSAGE,
            format!(
                "the client sent bytes {:02x?} where a TLS record header belongs: the stream is not TLS",
                &buf[..HEADER]
            ),
        ));
    }
    let body = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    if body > MAX_BODY_TLS12 {
        return Err(fail(
            alert::RECORD_OVERFLOW,
            format!(
                "TLS record of {body} bytes from the client exceeds the limit of {MAX_BODY_TLS12}"
            ),
        ));
    }
    Ok(Some(HEADER + body))
}

/// Opens incoming records.
pub(crate) struct Opener(Direction);

impl Opener {
    /// Open the whole record `record` (header first, exactly [`record_len`] bytes) in
    /// place; data ranges are relative to `record`.
    pub(crate) fn open(&mut self, record: &mut [u8]) -> Result<Opened, RecordError> {
        let d = &mut self.0;
        let (typ, body) = (record[0], record.len() - HEADER);
        if record[1] != 3 || !(1..=4).contains(&record[2]) {
            return Err(fail(
                alert::PROTOCOL_VERSION,
                format!(
                    "TLS record from the client has version bytes {:02x}{:02x}: the stream is not TLS",
                    record[1], record[2]
                ),
            ));
        }
        let limit = match d.version {
            Version::Tls13 => MAX_BODY_TLS13,
            Version::Tls12 => MAX_BODY_TLS12,
        };
        if body > limit {
            return Err(fail(
                alert::RECORD_OVERFLOW,
                format!("TLS record of {body} bytes from the client exceeds the limit of {limit}"),
            ));
        }
        if d.version == Version::Tls13 && typ == CHANGE_CIPHER_SPEC {
            return Err(fail(
                alert::UNEXPECTED_MESSAGE,
                "TLS change_cipher_spec from the client after the handshake",
            ));
        }
        if d.version == Version::Tls13 && typ != APPLICATION_DATA {
            return Err(fail(
                alert::UNEXPECTED_MESSAGE,
                format!("unencrypted TLS record of type {typ} from the client after the handshake"),
            ));
        }
        let explicit = d.version == Version::Tls12 && d.cipher != Cipher::Chacha20Poly1305;
        let overhead = TAG + if explicit { EXPLICIT_NONCE } else { 0 };
        if body < overhead {
            return Err(fail(
                alert::DECODE_ERROR,
                format!("TLS record of {body} bytes from the client is too short to be sealed"),
            ));
        }
        let mut aad = [0u8; TLS12_AAD];
        let (nonce, aad_len, cipher_at) = match d.version {
            Version::Tls13 => {
                aad[..HEADER].copy_from_slice(&record[..HEADER]);
                (d.nonce(), HEADER, HEADER)
            }
            Version::Tls12 => {
                let mut nonce = d.nonce();
                if explicit {
                    nonce[4..].copy_from_slice(&record[HEADER..HEADER + EXPLICIT_NONCE]);
                }
                aad = tls12_aad(d.seq, typ, body - overhead);
                (nonce, TLS12_AAD, HEADER + overhead - TAG)
            }
        };
        let seq = d.seq;
        let plain_len = d
            .key
            .open_in_place(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(&aad[..aad_len]),
                &mut record[cipher_at..],
            )
            .map_err(|_| {
                fail(
                    alert::BAD_RECORD_MAC,
                    format!("TLS record {seq} from the client failed authentication (altered or out of order)"),
                )
            })?
            .len();
        d.next_seq()?;
        let mut end = cipher_at + plain_len;
        let typ = match d.version {
            Version::Tls12 => typ,
            Version::Tls13 => {
                // The inner type is the last non-zero byte; zeros after it are padding.
                while end > cipher_at && record[end - 1] == 0 {
                    end -= 1;
                }
                if end == cipher_at {
                    return Err(fail(
                        alert::UNEXPECTED_MESSAGE,
                        "TLS record from the client has no content type",
                    ));
                }
                end -= 1;
                record[end]
            }
        };
        if end - cipher_at > MAX_FRAGMENT {
            return Err(fail(
                alert::RECORD_OVERFLOW,
                format!(
                    "TLS record from the client holds {} bytes, over the 2^14 limit",
                    end - cipher_at
                ),
            ));
        }
        let content = &record[cipher_at..end];
        match typ {
            APPLICATION_DATA => Ok(Opened::Data(cipher_at..end)),
            ALERT => match content {
                [_, alert::CLOSE_NOTIFY] => Ok(Opened::Closed),
                [1, _] if d.version == Version::Tls12 => Ok(Opened::Warning),
                [_, description] => Err(fail(
                    alert::CLOSE_NOTIFY,
                    format!("the client sent TLS alert {description}"),
                )),
                _ => Err(fail(
                    alert::DECODE_ERROR,
                    "malformed TLS alert from the client",
                )),
            },
            HANDSHAKE if d.version == Version::Tls13 => match content {
                [KEY_UPDATE, 0, 0, 1, request @ (0 | 1)] => {
                    let requested = *request == 1;
                    d.update()?;
                    Ok(Opened::KeyUpdate { requested })
                }
                [KEY_UPDATE, ..] => Err(fail(
                    alert::DECODE_ERROR,
                    "malformed TLS KeyUpdate from the client (or not alone in its record)",
                )),
                [other, ..] => Err(fail(
                    alert::UNEXPECTED_MESSAGE,
                    format!("unexpected TLS handshake message {other} from the client after the handshake"),
                )),
                [] => Err(fail(
                    alert::DECODE_ERROR,
                    "empty TLS handshake record from the client",
                )),
            },
            HANDSHAKE => Err(fail(
                alert::NO_RENEGOTIATION,
                "the client asked to renegotiate TLS 1.2, which tidemark refuses",
            )),
            other => Err(fail(
                alert::UNEXPECTED_MESSAGE,
                format!("unexpected TLS content type {other} from the client"),
            )),
        }
    }
}

/// What the request reader tells the reply writers: a KeyUpdate to answer before the next
/// record, or the alert to close with.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    state: Mutex<(bool, Option<u8>)>,
}

impl Pending {
    pub(crate) fn answer_key_update(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0 = true;
    }

    pub(crate) fn close_with(&self, alert: u8) {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .get_or_insert(alert);
    }

    /// Take the KeyUpdate answer owed, if any.
    pub(crate) fn take_key_update(&self) -> bool {
        std::mem::take(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()).0)
    }

    /// The alert to close with (close_notify if nothing failed).
    pub(crate) fn closing_alert(&self) -> u8 {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .unwrap_or(alert::CLOSE_NOTIFY)
    }
}

/// A per-connection copy of `config` whose key log captures the TLS 1.3 traffic secrets,
/// with secret extraction on.
pub(crate) fn capturing(
    config: &rustls::ServerConfig,
) -> (Arc<rustls::ServerConfig>, Arc<KeyCapture>) {
    let capture = Arc::new(KeyCapture::default());
    let mut config = config.clone();
    config.key_log = capture.clone();
    config.enable_secret_extraction = true;
    (Arc::new(config), capture)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use rustls::{CipherSuite, Connection};
    use std::io::{Read, Write};

    // A self-signed ECDSA P-256 certificate for "localhost", valid until 2126.
    pub(crate) const CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBujCCAV+gAwIBAgIUMmUoWv6uGQ841MNcBIyLfKco0HUwCgYIKoZIzj0EAwIw
FDESMBAGA1UEAwwJbG9jYWxob3N0MCAXDTI2MTIwNzAyMjU1MFoYDzIxMjYxMTEz
MDIyNTUwWjAUMRIwEAYDVQQDDAlsb2NhbGhvc3QwWTATBgcqhkjOPQIBBggqhkjO
PQMBBwNCAARuyP2bnnZLu7srweQ4juGpwfqiqfRk+Tv4EXcPGc3KeO9+MqiPiMJP
KiIfpInlvpAymoB+zDGVg9KWx+3sL8pYo4GMMIGJMB0GA1UdDgQWBBQAL+tRbF+B
JOtP2juZx0+nQZbNvTAfBgNVHSMEGDAWgBQAL+tRbF+BJOtP2juZx0+nQZbNvTAU
BgNVHREEDTALgglsb2NhbGhvc3QwDAYDVR0TAQH/BAIwADAOBgNVHQ8BAf8EBAMC
B4AwEwYDVR0lBAwwCgYIKwYBBQUHAwEwCgYIKoZIzj0EAwIDSQAwRgIhAKYS2QMU
FlLy1OKQOEDj+P9UlhkemOZEDPqtgLqj5bgoAiEAq8Q4V3/Qog3pYn/scDO2NC1j
pO4QAOYa+0n2ZhQ8/8c=
-----END CERTIFICATE-----
";
    pub(crate) const KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgqUk0haBQFuMaLrdR
b7BHiyXN5x19jonSx98NUA8lzB6hRANCAARuyP2bnnZLu7srweQ4juGpwfqiqfRk
+Tv4EXcPGc3KeO9+MqiPiMJPKiIfpInlvpAymoB+zDGVg9KWx+3sL8pY
-----END PRIVATE KEY-----
";

    const TLS13_SUITES: [CipherSuite; 3] = [
        CipherSuite::TLS13_AES_128_GCM_SHA256,
        CipherSuite::TLS13_AES_256_GCM_SHA384,
        CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    const TLS12_SUITES: [CipherSuite; 3] = [
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ];

    /// A rustls client and our record layer on the server side of one handshake, done in
    /// memory with `suite` only.
    pub(crate) fn established(suite: CipherSuite) -> (Connection, Secrets) {
        let mut provider = (*crate::tls::provider()).clone();
        provider.cipher_suites.retain(|s| s.suite() == suite);
        let provider = Arc::new(provider);
        let version: &[&rustls::SupportedProtocolVersion] = if TLS13_SUITES.contains(&suite) {
            &[&rustls::version::TLS13]
        } else {
            &[&rustls::version::TLS12]
        };
        let cert = CertificateDer::from_pem_slice(CERT.as_bytes()).unwrap();
        let key = PrivateKeyDer::from_pem_slice(KEY.as_bytes()).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(version)
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(version)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let (server, capture) = capturing(&server);
        let mut server = Connection::Server(rustls::ServerConnection::new(server).unwrap());
        let mut client = Connection::Client(
            rustls::ClientConnection::new(Arc::new(client), "localhost".try_into().unwrap())
                .unwrap(),
        );
        while client.is_handshaking() || server.is_handshaking() || server.wants_write() {
            transfer(&mut client, &mut server);
            transfer(&mut server, &mut client);
        }
        client.set_buffer_limit(None);
        let Connection::Server(server) = server else {
            unreachable!()
        };
        let secrets = Secrets::take(server, &capture).unwrap();
        (client, secrets)
    }

    pub(crate) fn transfer(from: &mut Connection, to: &mut Connection) {
        let mut wire = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut wire).unwrap();
        }
        feed(to, &wire).unwrap();
    }

    /// Give `wire` to rustls; its plaintext and whether it saw close_notify.
    pub(crate) fn feed(to: &mut Connection, wire: &[u8]) -> Result<(Vec<u8>, bool), rustls::Error> {
        let mut rd = wire;
        let mut plain = Vec::new();
        let mut closed = false;
        while !rd.is_empty() {
            to.read_tls(&mut rd).unwrap();
            to.process_new_packets()?;
            let mut chunk = [0u8; 65536];
            loop {
                match to.reader().read(&mut chunk) {
                    Ok(0) => {
                        closed = true;
                        break;
                    }
                    Ok(n) => plain.extend_from_slice(&chunk[..n]),
                    Err(_) => break,
                }
            }
        }
        Ok((plain, closed))
    }

    /// Open every record of `wire`: the application data and the other events.
    fn open_all(opener: &mut Opener, wire: &[u8]) -> Result<(Vec<u8>, Vec<Opened>), RecordError> {
        let mut wire = wire.to_vec();
        let (mut data, mut events, mut at) = (Vec::new(), Vec::new(), 0);
        while at < wire.len() {
            let len = record_len(&wire[at..])?.expect("a whole record header");
            let record = &mut wire[at..at + len];
            match opener.open(record)? {
                Opened::Data(range) => data.extend_from_slice(&record[range]),
                other => events.push(other),
            }
            at += len;
        }
        Ok((data, events))
    }

    /// What the reply writer does: renew the key if due, lay the plaintext out, seal it.
    fn seal_data(sealer: &mut Sealer, data: &[u8], out: &mut Vec<u8>) -> Result<(), RecordError> {
        for chunk in data.chunks(100_000) {
            sealer.renew_if_due(chunk.len(), out)?;
            let at = out.len();
            out.resize(at + sealer.sealed_len(chunk.len()), 0);
            for (range, piece) in sealer
                .plaintext_ranges(chunk.len())
                .zip(chunk.chunks(MAX_FRAGMENT))
            {
                out[at + range.start..at + range.end].copy_from_slice(piece);
            }
            sealer.seal_laid_out(&mut out[at..], chunk.len())?;
        }
        Ok(())
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    fn client_writes(client: &mut Connection, data: &[u8]) -> Vec<u8> {
        client.writer().write_all(data).unwrap();
        let mut wire = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut wire).unwrap();
        }
        wire
    }

    #[test]
    fn round_trips_with_rustls_in_every_suite() {
        for suite in TLS13_SUITES.into_iter().chain(TLS12_SUITES) {
            let (mut client, mut secrets) = established(suite);
            // Twice each way: sequence numbers carry on across calls.
            for round in 0..2u8 {
                let data = pattern(100_000 + usize::from(round), round);
                let mut wire = Vec::new();
                seal_data(&mut secrets.sealer, &data, &mut wire).unwrap();
                let (plain, closed) = feed(&mut client, &wire).unwrap();
                assert_eq!(plain, data, "{suite:?} server to client, round {round}");
                assert!(!closed);

                let data = pattern(70_001, round ^ 0x5a);
                let wire = client_writes(&mut client, &data);
                let (plain, events) = open_all(&mut secrets.opener, &wire).unwrap();
                assert_eq!(plain, data, "{suite:?} client to server, round {round}");
                assert!(events.is_empty());
            }
            // close_notify both ways.
            let mut wire = Vec::new();
            secrets
                .sealer
                .alert(alert::CLOSE_NOTIFY, &mut wire)
                .unwrap();
            assert_eq!(feed(&mut client, &wire).unwrap(), (Vec::new(), true));
            client.send_close_notify();
            let mut wire = Vec::new();
            client.write_tls(&mut wire).unwrap();
            let (_, events) = open_all(&mut secrets.opener, &wire).unwrap();
            assert_eq!(events, [Opened::Closed], "{suite:?}");
        }
    }

    #[test]
    fn follows_and_answers_key_updates() {
        for suite in TLS13_SUITES {
            let (mut client, mut secrets) = established(suite);
            // rustls asks us to update too; its next data is under its new key.
            client.refresh_traffic_keys().unwrap();
            let wire = client_writes(&mut client, b"after the client's update");
            let (plain, events) = open_all(&mut secrets.opener, &wire).unwrap();
            assert_eq!(events, [Opened::KeyUpdate { requested: true }], "{suite:?}");
            assert_eq!(plain, b"after the client's update");
            // Our answer, then data under our new key.
            let mut wire = Vec::new();
            secrets.sealer.key_update(false, &mut wire).unwrap();
            seal_data(&mut secrets.sealer, b"after ours", &mut wire).unwrap();
            assert_eq!(feed(&mut client, &wire).unwrap().0, b"after ours");
            // We ask; rustls answers before its next data.
            let mut wire = Vec::new();
            secrets.sealer.key_update(true, &mut wire).unwrap();
            seal_data(&mut secrets.sealer, b"asked", &mut wire).unwrap();
            assert_eq!(feed(&mut client, &wire).unwrap().0, b"asked");
            let wire = client_writes(&mut client, b"answered");
            let (plain, events) = open_all(&mut secrets.opener, &wire).unwrap();
            assert_eq!(
                events,
                [Opened::KeyUpdate { requested: false }],
                "{suite:?}"
            );
            assert_eq!(plain, b"answered");
        }
    }

    #[test]
    fn renews_the_key_at_the_confidentiality_limit() {
        let (mut client, mut secrets) = established(CipherSuite::TLS13_AES_128_GCM_SHA256);
        secrets.sealer.0.limit = secrets.sealer.0.seq + 6;
        for round in 0..2 {
            let data = pattern(5 * MAX_FRAGMENT, round);
            let mut wire = Vec::new();
            seal_data(&mut secrets.sealer, &data, &mut wire).unwrap();
            assert_eq!(feed(&mut client, &wire).unwrap().0, data);
        }
        // The second batch went out under a renewed key, from sequence number 0.
        assert_eq!(secrets.sealer.0.seq, 5);

        let (_, mut secrets) = established(CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256);
        secrets.sealer.0.limit = secrets.sealer.0.seq + 1;
        let err = seal_data(
            &mut secrets.sealer,
            &pattern(2 * MAX_FRAGMENT, 1),
            &mut Vec::new(),
        )
        .unwrap_err();
        assert!(err.message.contains("record limit"), "{err}");
    }

    #[test]
    fn refuses_altered_replayed_and_oversized_records() {
        for suite in [
            CipherSuite::TLS13_AES_256_GCM_SHA384,
            CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        ] {
            let (mut client, mut secrets) = established(suite);
            let mut wire = client_writes(&mut client, b"one");
            let last = wire.len() - 1;
            wire[last] ^= 1;
            let err = open_all(&mut secrets.opener, &wire).unwrap_err();
            assert_eq!(err.alert, alert::BAD_RECORD_MAC, "{suite:?}");
            assert!(err.message.contains("failed authentication"), "{err}");

            // A replayed record fails: the sequence number moved on.
            let (mut client, mut secrets) = established(suite);
            let wire = client_writes(&mut client, b"two");
            open_all(&mut secrets.opener, &wire).unwrap();
            let err = open_all(&mut secrets.opener, &wire).unwrap_err();
            assert_eq!(err.alert, alert::BAD_RECORD_MAC, "{suite:?}");
        }
        // Over the size limit: refused from the header, before reading the body.
        let err = record_len(&[APPLICATION_DATA, 3, 3, 0x48, 0x01]).unwrap_err();
        assert_eq!(err.alert, alert::RECORD_OVERFLOW);
        assert_eq!(
            record_len(&[APPLICATION_DATA, 3, 3, 0x48, 0x00]).unwrap(),
            Some(HEADER + MAX_BODY_TLS12)
        );
        assert_eq!(record_len(&[APPLICATION_DATA, 3, 3]).unwrap(), None);
        // TLS 1.3 allows less than TLS 1.2.
        let (_, mut secrets) = established(CipherSuite::TLS13_AES_128_GCM_SHA256);
        let body = MAX_BODY_TLS13 + 1;
        let mut record = vec![0u8; HEADER + body];
        record[..HEADER].copy_from_slice(&[APPLICATION_DATA, 3, 3, (body >> 8) as u8, body as u8]);
        let err = secrets.opener.open(&mut record).unwrap_err();
        assert_eq!(err.alert, alert::RECORD_OVERFLOW, "{err}");
        // Garbage that is not a TLS record at all.
        let err = record_len(b"GET / HTTP/1.1\r\n").unwrap_err();
        assert_eq!(err.alert, alert::UNEXPECTED_MESSAGE, "{err}");
        assert!(err.message.contains("not TLS"), "{err}");
        let mut record = [APPLICATION_DATA, 3, 9, 0, 0];
        let err = secrets.opener.open(&mut record).unwrap_err();
        assert_eq!(err.alert, alert::PROTOCOL_VERSION, "{err}");
    }

    #[test]
    fn key_schedule_matches_rfc_8448() {
        // RFC 8448 section 3: the server's handshake traffic secret and its key and IV.
        let secret = hex("b67b7d690cc16c4e75e54213cb2d37b4e9c912bcded9105d42befd59d391ad38");
        let (key, iv) = traffic_keys(&secret, Cipher::Aes128Gcm).unwrap();
        assert_eq!(*key, hex("3fce516009c21727d0f2e4e86ee403bc"));
        assert_eq!(iv.to_vec(), hex("5d313eb2671276ee13000b30"));
    }

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }
}
