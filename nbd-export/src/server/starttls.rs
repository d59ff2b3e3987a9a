//! The STARTTLS upgrade of a connection: the TLS handshake on the bytes the plain
//! handshake reader may already hold, the authorization check, and the record layer of
//! the transmission phase, run by the blocking transmission threads themselves: rustls
//! runs the handshake, then [`establish`] takes the keys out of it and the request reader
//! ([`TlsReader`]) and the reply writers ([`TlsWriter`]) each run one direction of
//! [`crate::record`] with no lock between them. So a client that stops reading replies
//! while it sends requests stalls the writers, never the reader: the same behaviour as
//! the plain path.

use std::fs::File;
use std::io::{self, IoSliceMut, Read, Write};
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::server::TlsStream;

use super::connection::ConnError;
use super::listener::NbdStream;
use super::transmission::SyncSocket;
use crate::record::{self, KeyCapture, Opened, Opener, Pending, RecordError, Sealer, Secrets};
use crate::tls::{Scope, TlsServer};

/// The stream under the TLS handshake: it first yields the bytes the plain handshake
/// reader already holds (the start of the ClientHello may sit there), and it hands rustls
/// whole records only, so that once negotiation ends nothing is left half-read inside
/// rustls: the ciphertext after the last record it took stays here, for the record layer
/// of the transmission phase.
pub(super) struct Records<S> {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Bytes of the record at `start` still to hand out (it is all in `buf`).
    give: usize,
    inner: S,
}

impl<S> Records<S> {
    pub(super) fn new(prefix: Vec<u8>, inner: S) -> Self {
        let end = prefix.len();
        let mut buf = prefix;
        buf.resize(end.max(2 * record::MAX_RECORD), 0);
        Records {
            buf,
            start: 0,
            end,
            give: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Records<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.give > 0 {
                let n = this.give.min(out.remaining());
                out.put_slice(&this.buf[this.start..this.start + n]);
                this.start += n;
                this.give -= n;
                return Poll::Ready(Ok(()));
            }
            let held = &this.buf[this.start..this.end];
            match record::record_len(held) {
                Ok(Some(len)) if held.len() >= len => {
                    this.give = len;
                    continue;
                }
                Ok(_) => {}
                // Not a record rustls takes: let it see the bytes and refuse them.
                Err(_) => {
                    this.give = held.len();
                    continue;
                }
            }
            if this.start > 0 {
                this.buf.copy_within(this.start..this.end, 0);
                this.end -= this.start;
                this.start = 0;
            }
            let mut room = ReadBuf::new(&mut this.buf[this.end..]);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut room))?;
            let n = room.filled().len();
            if n == 0 {
                // End of stream: whatever partial record is held goes to rustls, which
                // reports the truncation; then end-of-file.
                this.give = this.end;
                if this.give == 0 {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            this.end += n;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Records<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl AsyncRead for NbdStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            NbdStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            NbdStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for NbdStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            NbdStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            NbdStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            NbdStream::Unix(s) => Pin::new(s).poll_flush(cx),
            NbdStream::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            NbdStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            NbdStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A connection after STARTTLS.
pub(super) type Secured = TlsStream<Records<NbdStream>>;

/// Run the server side of the TLS handshake and authorize the client; the key capture
/// goes to [`establish`].
pub(super) async fn accept(
    tls: &TlsServer,
    buffered: Vec<u8>,
    stream: NbdStream,
) -> Result<(Secured, Scope, Arc<KeyCapture>), ConnError> {
    let (config, capture) = record::capturing(tls.config());
    let secured = tokio_rustls::TlsAcceptor::from(config)
        .accept(Records::new(buffered, stream))
        .await
        .map_err(|e| ConnError::Protocol(format!("TLS handshake failed: {e}")))?;
    let scope = tls
        .authorize(secured.get_ref().1.peer_certificates())
        .map_err(|e| ConnError::Protocol(format!("TLS client refused: {e}")))?;
    Ok((secured, scope, capture))
}

/// A connection after STARTTLS and negotiation, ready for the transmission threads: the
/// record layer's two directions and the ciphertext already read past the last record
/// rustls took.
pub(super) struct Established {
    pub(super) secrets: Secrets,
    pub(super) ciphertext: Vec<u8>,
}

/// Take the record layer out of rustls, so the blocking transmission threads run it
/// themselves on the plain socket, each direction on its own. Any plaintext rustls
/// decrypted and negotiation did not read is appended to `leftover`.
pub(super) fn establish(
    secured: Secured,
    capture: &KeyCapture,
    leftover: &mut Vec<u8>,
) -> Result<(NbdStream, Established), ConnError> {
    let (records, mut session) = secured.into_inner();
    let mut chunk = [0u8; 4096];
    loop {
        match session.reader().read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => leftover.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e.into()),
        }
    }
    if records.give > 0 {
        return Err(ConnError::Protocol(
            "a TLS record was half taken when transmission began".into(),
        ));
    }
    let secrets = Secrets::take(session, capture)
        .map_err(|e| ConnError::Protocol(format!("cannot start the TLS record layer: {e}")))?;
    let ciphertext = records.buf[records.start..records.end].to_vec();
    Ok((
        records.inner,
        Established {
            secrets,
            ciphertext,
        },
    ))
}

/// Ciphertext read from the socket at once.
const CIPHERTEXT_BUFFER: usize = 256 * 1024;

fn record_failed(pending: &Pending, err: RecordError) -> io::Error {
    pending.close_with(err.alert);
    io::Error::new(io::ErrorKind::InvalidData, err.message)
}

/// The request side of a TLS connection: reads ciphertext from the socket and opens its
/// records in place, on its own key and sequence number.
///
/// A KeyUpdate that asks for ours is answered by the reply writer before its next record
/// ([`Pending`]); a failure leaves the alert the writer closes with.
pub(super) struct TlsReader {
    socket: SyncSocket,
    opener: Opener,
    pending: Arc<Pending>,
    buf: Vec<u8>,
    /// Ciphertext not yet opened: `buf[start..end]`.
    start: usize,
    end: usize,
    /// Plaintext opened and not yet read: `buf[plain.start..plain.end]` (before `start`).
    plain: Range<usize>,
    closed: bool,
}

impl TlsReader {
    pub(super) fn new(
        socket: SyncSocket,
        opener: Opener,
        pending: Arc<Pending>,
        leftover: Vec<u8>,
    ) -> Self {
        let end = leftover.len();
        let mut buf = leftover;
        buf.resize(end.max(CIPHERTEXT_BUFFER), 0);
        TlsReader {
            socket,
            opener,
            pending,
            buf,
            start: 0,
            end,
            plain: 0..0,
            closed: false,
        }
    }

    /// Whether bytes of the stream wait here (ciphertext not yet opened, or plaintext
    /// opened and not yet read).
    pub(super) fn buffered(&self) -> bool {
        self.start < self.end || !self.plain.is_empty()
    }

    /// Open records until one yields plaintext; false at the end of the stream.
    fn fill(&mut self) -> io::Result<bool> {
        loop {
            if self.closed {
                return Ok(false);
            }
            let held = &self.buf[self.start..self.end];
            let len = record::record_len(held).map_err(|e| record_failed(&self.pending, e))?;
            match len {
                Some(len) if held.len() >= len => {
                    let at = self.start;
                    self.start += len;
                    let opened = self
                        .opener
                        .open(&mut self.buf[at..at + len])
                        .map_err(|e| record_failed(&self.pending, e))?;
                    match opened {
                        Opened::Data(range) if !range.is_empty() => {
                            self.plain = at + range.start..at + range.end;
                            return Ok(true);
                        }
                        Opened::Data(_) | Opened::Warning => {}
                        Opened::KeyUpdate { requested } => {
                            if requested {
                                self.pending.answer_key_update();
                            }
                        }
                        Opened::Closed => {
                            self.closed = true;
                            return Ok(false);
                        }
                    }
                }
                _ => {
                    if self.start > 0 {
                        self.buf.copy_within(self.start..self.end, 0);
                        self.end -= self.start;
                        self.start = 0;
                    }
                    let n = loop {
                        match self.socket.read(&mut self.buf[self.end..]) {
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            read => break read?,
                        }
                    };
                    if n == 0 {
                        // The socket ended without close_notify: for NBD, whose requests
                        // carry their own lengths, a truncation shows as a short request
                        // or payload.
                        return Ok(false);
                    }
                    self.end += n;
                }
            }
        }
    }
}

impl Read for TlsReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.plain.is_empty() && !self.fill()? {
            return Ok(0);
        }
        let n = buf.len().min(self.plain.len());
        buf[..n].copy_from_slice(&self.buf[self.plain.start..self.plain.start + n]);
        self.plain.start += n;
        Ok(n)
    }
}

/// Plaintext a writer seals before sending it (bounds the output buffer).
const SEAL_CHUNK: usize = 1024 * 1024;

/// The reply side of a TLS connection, used under the connection's reply lock: lays each
/// reply's plaintext out in its output buffer between record headers and tags, seals the
/// records in place on its own key and sequence number, and sends them in one write per
/// reply (or per MiB of it).
pub(super) struct TlsWriter {
    socket: SyncSocket,
    sealer: Sealer,
    pending: Arc<Pending>,
    /// Records built for the socket; kept at its largest size (no zeroing per reply).
    out: Vec<u8>,
    /// Records that go before the data: a KeyUpdate, an alert, a short tail.
    control: Vec<u8>,
}

impl TlsWriter {
    pub(super) fn new(socket: SyncSocket, sealer: Sealer, pending: Arc<Pending>) -> Self {
        TlsWriter {
            socket,
            sealer,
            pending,
            out: Vec::new(),
            control: Vec::new(),
        }
    }

    /// Seal `data` and send the records, after the KeyUpdate answer owed, if any.
    pub(super) fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        self.write_parts(data, None, &[], None)
    }

    /// Send `head`, then `len` bytes of `file` at `offset` read straight into the records,
    /// then `tail`; if the file cannot supply them, the data is zeroes and `failed` follows
    /// instead of `tail` (without `failed`, an error: the header promised the data).
    pub(super) fn write_file(
        &mut self,
        head: &[u8],
        file: (&File, u64, usize),
        tail: &[u8],
        failed: Option<&[u8]>,
    ) -> io::Result<()> {
        self.write_parts(head, Some(file), tail, failed)
    }

    /// Seal and send the stream `head` ++ the file range, in chunks of [`SEAL_CHUNK`], with
    /// `tail` (or `failed`, if reading the file failed) sealed after the last.
    fn write_parts(
        &mut self,
        head: &[u8],
        file: Option<(&File, u64, usize)>,
        tail: &[u8],
        failed: Option<&[u8]>,
    ) -> io::Result<()> {
        let total = head.len() + file.map_or(0, |f| f.2);
        let mut error = None;
        self.control.clear();
        if self.pending.take_key_update() {
            self.sealer
                .key_update(false, &mut self.control)
                .map_err(io::Error::other)?;
        }
        let mut at = 0;
        loop {
            let len = SEAL_CHUNK.min(total - at);
            self.sealer
                .renew_if_due(len, &mut self.control)
                .map_err(io::Error::other)?;
            let c = self.control.len();
            let mut end = c + self.sealer.sealed_len(len);
            if self.out.len() < end {
                self.out.resize(end, 0);
            }
            self.out[..c].copy_from_slice(&self.control);
            self.control.clear();
            let mut reads: Vec<(Range<usize>, u64)> = Vec::new();
            for (range, start) in self
                .sealer
                .plaintext_ranges(len)
                .zip((at..).step_by(record::MAX_FRAGMENT))
            {
                let range = c + range.start..c + range.end;
                let stop = start + range.len();
                // The part of this record from `head`, then the part from the file.
                let from_head = head.len().clamp(start, stop) - start;
                if from_head > 0 {
                    self.out[range.start..range.start + from_head]
                        .copy_from_slice(&head[start..start + from_head]);
                }
                if from_head < range.len() {
                    let file_at = (start + from_head - head.len()) as u64;
                    reads.push((range.start + from_head..range.end, file_at));
                }
            }
            if let Some((file, offset, _)) = file {
                read_into(&mut self.out, &reads, file, offset, &mut error);
            }
            at += len;
            let trailer = if at < total {
                None
            } else {
                match (error.take(), failed) {
                    (None, _) => Some(tail),
                    (Some(error), Some(failed)) => {
                        tracing::debug!("reading READ data from the file failed: {error}");
                        Some(failed)
                    }
                    (Some(error), None) => {
                        // Nothing can tell the client: the connection ends. This chunk
                        // stays unsealed, so what was sealed (a KeyUpdate first) goes out
                        // and the sequence numbers stay in step for the closing alert.
                        self.socket.write_all(&self.out[..c])?;
                        return Err(error);
                    }
                }
            };
            self.sealer
                .seal_laid_out(&mut self.out[c..end], len)
                .map_err(io::Error::other)?;
            if let Some(trailer) = trailer {
                if !trailer.is_empty() {
                    self.sealer
                        .seal_data(trailer, &mut self.control)
                        .map_err(io::Error::other)?;
                    let t = self.control.len();
                    if self.out.len() < end + t {
                        self.out.resize(end + t, 0);
                    }
                    self.out[end..end + t].copy_from_slice(&self.control);
                    self.control.clear();
                    end += t;
                }
                return self.socket.write_all(&self.out[..end]);
            }
            self.socket.write_all(&self.out[..end])?;
        }
    }

    /// End the session: close_notify, or the alert a failed record calls for; best
    /// effort, as the client may be gone.
    pub(super) fn close(&mut self) {
        self.control.clear();
        if self
            .sealer
            .alert(self.pending.closing_alert(), &mut self.control)
            .is_ok()
        {
            let _ = self.socket.write_all(&self.control);
        }
    }
}

/// Read file data into `out` at `reads` (buffer range, offset from `base` in the file),
/// with one preadv for all of them as long as the file delivers; from the first failure
/// on, zeroes, and the failure goes to `error` (after a failure, only zeroes).
fn read_into(
    out: &mut [u8],
    reads: &[(Range<usize>, u64)],
    file: &File,
    base: u64,
    error: &mut Option<io::Error>,
) {
    let Some(first) = reads.first() else {
        return;
    };
    let mut done = 0;
    if error.is_none() {
        let mut slices = Vec::with_capacity(reads.len());
        let mut rest = &mut out[first.0.start..];
        let mut rest_at = first.0.start;
        for (range, _) in reads {
            let (_, from) = rest.split_at_mut(range.start - rest_at);
            let (piece, after) = from.split_at_mut(range.len());
            slices.push(IoSliceMut::new(piece));
            rest = after;
            rest_at = range.end;
        }
        let want: usize = reads.iter().map(|(r, _)| r.len()).sum();
        let mut offset = base + first.1;
        let mut bufs = &mut slices[..];
        while done < want {
            match rustix::io::preadv(file, bufs, offset) {
                Ok(0) => {
                    *error = Some(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "the file ended before offset {}",
                            base + first.1 + want as u64
                        ),
                    ));
                    break;
                }
                Ok(n) => {
                    done += n;
                    offset += n as u64;
                    IoSliceMut::advance_slices(&mut bufs, n);
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    *error = Some(e.into());
                    break;
                }
            }
        }
    }
    // Zeroes where the file did not deliver.
    let mut skip = done;
    for (range, _) in reads {
        let filled = skip.min(range.len());
        skip -= filled;
        out[range.start + filled..range.end].fill(0);
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    use rustls::CipherSuite;

    use super::*;
    use crate::record::tests::{established, feed};
    use crate::record::MAX_FRAGMENT;
    use crate::server::command::Reply;

    /// The file the replies read from: a pattern with no period that divides a record.
    fn source(len: usize) -> (tempfile::NamedTempFile, Vec<u8>) {
        let data: Vec<u8> = (0..len)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0] ^ (i >> 16) as u8)
            .collect();
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&data).unwrap();
        (file, data)
    }

    fn head(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| seed.wrapping_add(i as u8)).collect()
    }

    /// What the writer is given: a reply, or the reader's news of a KeyUpdate that asks
    /// for ours (answered before the next reply).
    enum Step {
        Send(Reply),
        AnswerKeyUpdate,
    }

    /// Run `steps` through one [`TlsWriter`] on a socket, close it, and open everything it
    /// sent with rustls: the plaintext and whether it ended with close_notify, and each
    /// step's result.
    fn run(
        suite: CipherSuite,
        file: &File,
        steps: &[Step],
    ) -> (Vec<u8>, bool, Vec<io::Result<()>>) {
        let (mut client, secrets) = established(suite);
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let wire = std::thread::spawn(move || {
            let mut wire = Vec::new();
            theirs.read_to_end(&mut wire).unwrap();
            wire
        });
        let pending = Arc::new(Pending::default());
        let mut writer = TlsWriter::new(SyncSocket::Unix(ours), secrets.sealer, pending.clone());
        let mut results = Vec::new();
        for step in steps {
            match step {
                Step::Send(Reply::Bytes(data, len)) => {
                    results.push(writer.write_all(&data[..*len]))
                }
                Step::Send(Reply::File {
                    head,
                    offset,
                    len,
                    tail,
                    failed,
                }) => results.push(writer.write_file(
                    head,
                    (file, *offset, *len),
                    tail,
                    failed.as_deref(),
                )),
                Step::AnswerKeyUpdate => pending.answer_key_update(),
            }
        }
        writer.close();
        drop(writer);
        let wire = wire.join().unwrap();
        let (plain, closed) = feed(&mut client, &wire).unwrap();
        (plain, closed, results)
    }

    #[test]
    fn file_replies_read_the_right_bytes_into_the_records() {
        const CHUNK: usize = SEAL_CHUNK;
        let (file, data) = source(3 * CHUNK + 12_345);
        let file = file.as_file();
        // (head length, file offset, data length, tail length): unaligned offsets and
        // lengths, a head that ends a record, data that ends one byte into the next
        // record, replies of exactly one sealing chunk and of several.
        let cases: [(usize, usize, usize, usize); 10] = [
            (16, 0, 4096, 0),
            (16, 1, 1, 0),
            (20, 12_345, MAX_FRAGMENT - 20, 0),
            (20, 777, MAX_FRAGMENT - 19, 20),
            (32, MAX_FRAGMENT - 1, 3 * MAX_FRAGMENT + 5, 20),
            (16, 99, CHUNK - 16, 0),
            (16, 4097, CHUNK - 15, 20),
            (20, 65_537, 2 * CHUNK + 3, 20),
            (0, 5, MAX_FRAGMENT + 1, 0),
            (16, data.len() - 3, 3, 20),
        ];
        let mut steps = Vec::new();
        let mut expected = Vec::new();
        for (i, &(h, offset, len, t)) in cases.iter().enumerate() {
            if i == 4 {
                // A KeyUpdate answer goes out before the next reply's records.
                steps.push(Step::AnswerKeyUpdate);
                // A long reply of bytes only: the head past the first record.
                let bytes = head(3 * MAX_FRAGMENT + 7, 9);
                expected.extend_from_slice(&bytes);
                steps.push(Step::Send(Reply::Bytes(bytes, 3 * MAX_FRAGMENT + 7)));
            }
            let (head, tail) = (head(h, i as u8), head(t, 0x80 | i as u8));
            expected.extend_from_slice(&head);
            expected.extend_from_slice(&data[offset..offset + len]);
            expected.extend_from_slice(&tail);
            steps.push(Step::Send(Reply::File {
                head,
                offset: offset as u64,
                len,
                tail,
                failed: Some(b"not sent".to_vec()),
            }));
        }
        for (suite, key_update) in [
            (CipherSuite::TLS13_AES_128_GCM_SHA256, true),
            (CipherSuite::TLS13_CHACHA20_POLY1305_SHA256, true),
            // TLS 1.2 (an explicit nonce before each record's plaintext) has no KeyUpdate.
            (CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384, false),
        ] {
            if !key_update {
                steps.retain(|step| !matches!(step, Step::AnswerKeyUpdate));
            }
            let (plain, closed, results) = run(suite, file, &steps);
            for (i, result) in results.iter().enumerate() {
                assert!(result.is_ok(), "{suite:?} reply {i}: {result:?}");
            }
            assert!(closed, "{suite:?}: no close_notify");
            assert_eq!(plain.len(), expected.len(), "{suite:?}");
            let first_bad = plain.iter().zip(&expected).position(|(a, b)| a != b);
            assert_eq!(first_bad, None, "{suite:?}: the stream differs");
        }
    }

    #[test]
    fn a_file_that_ends_early_sends_zeroes_then_the_failure_reply() {
        let (file, data) = source(100_000);
        let file = file.as_file();
        let (h, tail, failed) = (head(20, 1), head(20, 2), b"the READ failed".to_vec());
        let reply = |offset: u64, len: usize, failed: Option<&Vec<u8>>| {
            Step::Send(Reply::File {
                head: h.clone(),
                offset,
                len,
                tail: tail.clone(),
                failed: failed.cloned(),
            })
        };
        let steps = [
            // 40 000 bytes asked from offset 80 000: 20 000 exist, the rest are zeroes.
            reply(80_000, 40_000, Some(&failed)),
            // The stream stays usable: the next reply is whole.
            reply(3, 50_000, Some(&failed)),
            // Without a failure reply to send, the writer reports the error.
            reply(99_999, 2, None),
        ];
        let (plain, closed, results) = run(CipherSuite::TLS13_AES_256_GCM_SHA384, file, &steps);
        assert!(results[0].is_ok() && results[1].is_ok(), "{results:?}");
        let err = results[2].as_ref().unwrap_err();
        assert!(
            err.to_string()
                .contains("the file ended before offset 100001"),
            "{err}"
        );
        let mut expected = h.clone();
        expected.extend_from_slice(&data[80_000..]);
        expected.extend_from_slice(&[0; 20_000]);
        expected.extend_from_slice(&failed);
        expected.extend_from_slice(&h);
        expected.extend_from_slice(&data[3..50_003]);
        expected.extend_from_slice(&tail);
        assert!(closed);
        assert_eq!(plain.len(), expected.len());
        assert!(plain == expected, "the stream differs");
    }
}
