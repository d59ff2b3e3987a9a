//! One request: validate it against the session, run it on the export, encode its reply.

use crate::export::{Errno, Export, ExportError, MetaContext, ZeroFlags, STATE_ZERO};
use crate::negotiate::Session;
use crate::proto::{self, cflags, chunk, tflags, Command, HeaderMode, Request};

use super::transmission::{Conn, Payload};

/// A command error: errno and a message for the client and the log.
type CmdError = (Errno, String);

fn cmd_err(errno: Errno, message: impl Into<String>) -> CmdError {
    (errno, message.into())
}

/// Check a request against the negotiated session, as doc/proto.md lists the errors.
pub(super) fn validate(session: &Session, req: &Request) -> Result<(), CmdError> {
    let caps = session.export.capabilities();
    let structured = session.mode >= HeaderMode::Structured;
    let mut allowed = cflags::FUA;
    match req.command {
        Command::Read if structured => allowed |= cflags::DF,
        Command::WriteZeroes => {
            allowed |= cflags::NO_HOLE;
            if session.flags & tflags::SEND_FAST_ZERO != 0 {
                allowed |= cflags::FAST_ZERO;
            }
        }
        Command::BlockStatus => allowed |= cflags::REQ_ONE,
        Command::Write if session.mode == HeaderMode::Extended => allowed |= cflags::PAYLOAD_LEN,
        _ => {}
    }
    if req.flags & !allowed != 0 {
        return Err(cmd_err(
            Errno::Inval,
            format!(
                "flags {:#x} are not valid on {}",
                req.flags & !allowed,
                req.command
            ),
        ));
    }
    let writes = matches!(
        req.command,
        Command::Write | Command::Trim | Command::WriteZeroes
    );
    match req.command {
        Command::Unknown(code) => {
            return Err(cmd_err(Errno::Inval, format!("unknown command {code}")))
        }
        Command::Flush if !caps.flush => {
            return Err(cmd_err(Errno::Inval, "FLUSH was not advertised"))
        }
        Command::Flush => return Ok(()),
        Command::Trim if session.flags & tflags::SEND_TRIM == 0 && !caps.read_only => {
            return Err(cmd_err(Errno::Inval, "TRIM was not advertised"))
        }
        Command::WriteZeroes
            if session.flags & tflags::SEND_WRITE_ZEROES == 0 && !caps.read_only =>
        {
            return Err(cmd_err(Errno::Inval, "WRITE_ZEROES was not advertised"))
        }
        Command::Cache if !caps.cache => {
            return Err(cmd_err(Errno::Inval, "CACHE was not advertised"))
        }
        Command::BlockStatus if session.contexts.is_empty() => {
            return Err(cmd_err(
                Errno::Inval,
                "BLOCK_STATUS needs metadata contexts chosen with NBD_OPT_SET_META_CONTEXT",
            ))
        }
        _ => {}
    }
    let releases = req.command == Command::Trim && caps.trim;
    if writes && caps.read_only && !releases {
        return Err(cmd_err(
            Errno::Perm,
            format!("{} on the read-only export {:?}", req.command, session.name),
        ));
    }
    if req.length == 0 {
        return Err(cmd_err(
            Errno::Inval,
            format!("{} of zero length", req.command),
        ));
    }
    if matches!(req.command, Command::Read | Command::Write)
        && req.length > u64::from(proto::MAX_PAYLOAD)
    {
        return Err(cmd_err(
            Errno::Inval,
            format!(
                "{} of {} bytes exceeds the {} byte maximum block size",
                req.command,
                req.length,
                proto::MAX_PAYLOAD
            ),
        ));
    }
    let size = session.export.size();
    let past_end = req
        .offset
        .checked_add(req.length)
        .is_none_or(|end| end > size);
    if past_end {
        let errno = if matches!(req.command, Command::Write | Command::WriteZeroes) {
            Errno::NoSpc
        } else {
            Errno::Inval
        };
        return Err(cmd_err(
            errno,
            format!(
                "{} of {} bytes at {} runs past the end of the {size}-byte export",
                req.command, req.length, req.offset
            ),
        ));
    }
    Ok(())
}

/// The success reply of a command without data.
fn ok_reply(mode: HeaderMode, req: &Request) -> Vec<u8> {
    let mut out = Vec::with_capacity(proto::EXTENDED_REPLY_LEN);
    if mode == HeaderMode::Extended {
        proto::encode_none_chunk(&mut out, mode, req.cookie, req.offset);
    } else {
        proto::encode_simple_reply(&mut out, req.cookie, 0);
    }
    out
}

/// The error reply: an error chunk with the message when structured replies are on.
pub(super) fn error_reply(
    mode: HeaderMode,
    req: &Request,
    errno: Errno,
    message: impl AsRef<str>,
) -> Vec<u8> {
    let mut out = Vec::new();
    if mode == HeaderMode::Simple {
        proto::encode_simple_reply(&mut out, req.cookie, errno.code());
    } else {
        proto::encode_error_chunk(
            &mut out,
            mode,
            req.cookie,
            req.offset,
            errno.code(),
            message.as_ref(),
        );
    }
    out
}

/// A reply ready to send.
pub(super) enum Reply {
    /// The first `len` bytes of the buffer (which may be a pooled one, longer).
    Bytes(Vec<u8>, usize),
    /// `head`, then `len` bytes of the export's backing file at `offset` (sent with
    /// sendfile(2), or under TLS read straight into the records), then `tail`. If the file cannot supply them, the data is padded with
    /// zeroes and `failed` is sent instead of `tail`; without `failed` (a simple reply,
    /// whose header already promised the data) the connection is closed.
    File {
        head: Vec<u8>,
        offset: u64,
        len: usize,
        tail: Vec<u8>,
        failed: Option<Vec<u8>>,
    },
}

impl Reply {
    pub(super) fn bytes(buf: Vec<u8>) -> Reply {
        let len = buf.len();
        Reply::Bytes(buf, len)
    }
}

/// Reads of at least this many bytes go out with sendfile(2) (under TLS: are read from
/// the file into the records) when the export has a backing file; for smaller ones the
/// copy is cheaper than the extra system calls.
const SENDFILE_MIN: usize = 64 * 1024;

/// Run a validated request on a blocking thread.
pub(super) fn execute(conn: &Conn, req: &Request, payload: Option<Payload>) -> Reply {
    let session = &conn.session;
    let export = session.export.as_ref();
    let mode = session.mode;
    let fua = req.flags & cflags::FUA != 0;
    let done = |r: Result<(), ExportError>| -> Reply {
        Reply::bytes(match r {
            Ok(()) => ok_reply(mode, req),
            Err(e) => {
                tracing::debug!("{} at {} failed: {e}", req.command, req.offset);
                error_reply(mode, req, e.errno, &e.message)
            }
        })
    };
    match req.command {
        Command::Read => match read_reply(conn, req) {
            Ok(reply) => {
                conn.counters.read(req.length);
                reply
            }
            Err(e) => {
                tracing::debug!("READ at {} failed: {e}", req.offset);
                Reply::bytes(error_reply(mode, req, e.errno, &e.message))
            }
        },
        Command::Write => {
            let data = payload.as_ref().map_or(&[][..], Payload::bytes);
            let result = export.write(req.offset, data, fua);
            if let Some(payload) = payload {
                conn.recycle(payload);
            }
            if result.is_ok() {
                conn.counters.written(req.length);
            }
            done(result)
        }
        Command::Flush => done(export.flush()),
        Command::Trim => done(export.trim(req.offset, req.length, fua)),
        Command::WriteZeroes => done(export.write_zeroes(
            req.offset,
            req.length,
            ZeroFlags {
                fua,
                no_hole: req.flags & cflags::NO_HOLE != 0,
                fast: req.flags & cflags::FAST_ZERO != 0,
            },
        )),
        Command::Cache => done(export.cache(req.offset, req.length)),
        Command::BlockStatus => match block_status_reply(session, req) {
            Ok(reply) => Reply::bytes(reply),
            Err(e) => Reply::bytes(error_reply(mode, req, e.errno, &e.message)),
        },
        Command::Disc | Command::Unknown(_) => {
            done(Err(ExportError::new(Errno::Inval, "not a command")))
        }
    }
}

/// READ: a simple reply, one OFFSET_DATA chunk, or data and hole chunks where the export
/// knows its holes (never with DF); large data straight from the backing file if any.
fn read_reply(conn: &Conn, req: &Request) -> Result<Reply, ExportError> {
    let session = &conn.session;
    let mode = session.mode;
    let len = req.length as usize;
    let from_file = len >= SENDFILE_MIN && session.export.backing_file().is_some();
    if mode == HeaderMode::Simple && from_file {
        let mut head = Vec::with_capacity(proto::SIMPLE_REPLY_LEN);
        proto::encode_simple_reply(&mut head, req.cookie, 0);
        return Ok(Reply::File {
            head,
            offset: req.offset,
            len,
            tail: Vec::new(),
            failed: None,
        });
    }
    if mode == HeaderMode::Simple {
        let mut buf = conn.pool.get(proto::SIMPLE_REPLY_LEN + len);
        if let Err(e) = session.export.read(
            req.offset,
            &mut buf[proto::SIMPLE_REPLY_LEN..proto::SIMPLE_REPLY_LEN + len],
        ) {
            conn.pool.put(buf);
            return Err(e);
        }
        let mut header = Vec::with_capacity(proto::SIMPLE_REPLY_LEN);
        proto::encode_simple_reply(&mut header, req.cookie, 0);
        buf[..proto::SIMPLE_REPLY_LEN].copy_from_slice(&header);
        return Ok(Reply::Bytes(buf, proto::SIMPLE_REPLY_LEN + len));
    }
    let caps = session.export.capabilities();
    if caps.knows_holes && req.flags & cflags::DF == 0 {
        match allocation_map(session.export.as_ref(), req.offset, req.length) {
            Ok(map) if map.len() > 1 || map.first().is_some_and(|&(_, zero)| zero) => {
                return sparse_read_reply(conn, req, &map).map(Reply::bytes);
            }
            Ok(_) => {}
            // Not knowing is no reason to fail a read.
            Err(e) => tracing::debug!("allocation lookup for READ at {} failed: {e}", req.offset),
        }
    }
    if from_file {
        // The data chunk is not the last: an error found while sending can still follow.
        let mut head = Vec::with_capacity(mode.chunk_header_len() + 8);
        proto::encode_chunk_header(
            &mut head,
            mode,
            0,
            chunk::OFFSET_DATA,
            req.cookie,
            req.offset,
            8 + len as u64,
        );
        head.extend_from_slice(&req.offset.to_be_bytes());
        let mut tail = Vec::with_capacity(mode.chunk_header_len());
        proto::encode_none_chunk(&mut tail, mode, req.cookie, req.offset);
        return Ok(Reply::File {
            head,
            offset: req.offset,
            len,
            tail,
            failed: Some(error_reply(
                mode,
                req,
                Errno::Io,
                format!("reading {len} bytes at {} failed", req.offset),
            )),
        });
    }
    let hlen = mode.chunk_header_len() + 8;
    let mut buf = conn.pool.get(hlen + len);
    if let Err(e) = session.export.read(req.offset, &mut buf[hlen..hlen + len]) {
        conn.pool.put(buf);
        return Err(e);
    }
    proto::write_chunk_header(
        &mut buf,
        mode,
        chunk::FLAG_DONE,
        chunk::OFFSET_DATA,
        req.cookie,
        req.offset,
        8 + len as u64,
    );
    buf[hlen - 8..hlen].copy_from_slice(&req.offset.to_be_bytes());
    Ok(Reply::Bytes(buf, hlen + len))
}

/// The range as (length, reads-as-zero) runs, merged, covering it exactly.
fn allocation_map(
    export: &dyn Export,
    offset: u64,
    length: u64,
) -> Result<Vec<(u64, bool)>, ExportError> {
    let extents = collect_extents(
        export,
        &MetaContext::BaseAllocation,
        offset,
        length,
        false,
        u64::MAX,
    )?;
    let mut map: Vec<(u64, bool)> = Vec::new();
    let mut covered = 0;
    for (len, flags) in extents {
        let zero = flags & STATE_ZERO != 0;
        covered += len;
        match map.last_mut() {
            Some(last) if last.1 == zero => last.0 += len,
            _ => map.push((len, zero)),
        }
    }
    if covered < length {
        // The export described less than asked: read the rest as data.
        match map.last_mut() {
            Some(last) if !last.1 => last.0 += length - covered,
            _ => map.push((length - covered, false)),
        }
    }
    Ok(map)
}

fn sparse_read_reply(
    conn: &Conn,
    req: &Request,
    map: &[(u64, bool)],
) -> Result<Vec<u8>, ExportError> {
    let mode = conn.session.mode;
    let hlen = mode.chunk_header_len();
    let data_bytes: u64 = map
        .iter()
        .filter(|(_, zero)| !zero)
        .map(|(len, _)| len)
        .sum();
    let mut out = Vec::with_capacity(data_bytes as usize + map.len() * (hlen + 12) + hlen);
    let mut offset = req.offset;
    for &(len, zero) in map {
        if zero {
            proto::encode_hole_chunk(
                &mut out, mode, 0, req.cookie, req.offset, offset, len as u32,
            );
        } else {
            proto::encode_chunk_header(
                &mut out,
                mode,
                0,
                chunk::OFFSET_DATA,
                req.cookie,
                req.offset,
                8 + len,
            );
            out.extend_from_slice(&offset.to_be_bytes());
            let start = out.len();
            out.resize(start + len as usize, 0);
            conn.session.export.read(offset, &mut out[start..])?;
        }
        offset += len;
    }
    proto::encode_none_chunk(&mut out, mode, req.cookie, req.offset);
    Ok(out)
}

/// Up to [`proto::MAX_EXTENTS`] extents of `context` over `[offset, offset + length)`:
/// re-queried while the export answers short, neighbours with equal flags merged, the
/// last one trimmed to the range, each at most `max_extent` long.
fn collect_extents(
    export: &dyn Export,
    context: &MetaContext,
    offset: u64,
    length: u64,
    req_one: bool,
    max_extent: u64,
) -> Result<Vec<(u64, u32)>, ExportError> {
    let end = offset + length;
    let mut out: Vec<(u64, u32)> = Vec::new();
    let mut cursor = offset;
    let mut calls = 0;
    'query: while cursor < end && calls < 65_536 {
        calls += 1;
        let extents = export.block_status(context, cursor, end - cursor)?;
        if extents.is_empty() {
            break;
        }
        for extent in extents {
            if extent.length == 0 {
                return Err(ExportError::new(
                    Errno::Io,
                    format!("the export reported a zero-length extent at {cursor}"),
                ));
            }
            let mut len = extent.length.min(end - cursor);
            while len > 0 {
                let count = out.len();
                match out.last_mut() {
                    Some(last) if last.1 == extent.flags && last.0 < max_extent => {
                        let add = len.min(max_extent - last.0);
                        last.0 += add;
                        len -= add;
                        cursor += add;
                    }
                    Some(_) if req_one => break 'query,
                    _ if count >= proto::MAX_EXTENTS => break 'query,
                    _ => {
                        let add = len.min(max_extent);
                        out.push((add, extent.flags));
                        len -= add;
                        cursor += add;
                    }
                }
            }
            if cursor >= end {
                break 'query;
            }
        }
    }
    if out.is_empty() {
        return Err(ExportError::new(
            Errno::Io,
            format!(
                "the export reported no extents at {offset} for {}",
                context.wire_name()
            ),
        ));
    }
    Ok(out)
}

fn block_status_reply(session: &Session, req: &Request) -> Result<Vec<u8>, ExportError> {
    let mode = session.mode;
    let req_one = req.flags & cflags::REQ_ONE != 0;
    // 32-bit descriptors: keep each under 4 GiB and 4 KiB aligned.
    let max_extent = if mode == HeaderMode::Extended {
        u64::MAX
    } else {
        u64::from(u32::MAX) & !4095
    };
    let mut out = Vec::new();
    let count = session.contexts.len();
    for (i, (id, context)) in session.contexts.iter().enumerate() {
        let extents = collect_extents(
            session.export.as_ref(),
            context,
            req.offset,
            req.length,
            req_one,
            max_extent,
        )?;
        let flags = if i + 1 == count { chunk::FLAG_DONE } else { 0 };
        proto::encode_block_status_chunk(
            &mut out, mode, flags, req.cookie, req.offset, *id, &extents,
        );
    }
    Ok(out)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::export::{Capabilities, ExportResult, Extent};

    /// A read-only export of ones in 4 KiB stripes of data and hole (also the
    /// transmission-only test's export).
    pub(in crate::server) struct Striped;
    impl Export for Striped {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities {
                read_only: true,
                flush: false,
                trim: false,
                write_zeroes: false,
                fast_zero: false,
                cache: false,
                multi_conn: true,
                knows_holes: true,
            }
        }
        fn read(&self, _: u64, buf: &mut [u8]) -> ExportResult<()> {
            buf.fill(1);
            Ok(())
        }
        fn write(&self, _: u64, _: &[u8], _: bool) -> ExportResult<()> {
            Ok(())
        }
        fn flush(&self) -> ExportResult<()> {
            Ok(())
        }
        fn trim(&self, _: u64, _: u64, _: bool) -> ExportResult<()> {
            Ok(())
        }
        fn write_zeroes(&self, _: u64, _: u64, _: ZeroFlags) -> ExportResult<()> {
            Ok(())
        }
        /// 4 KiB stripes, alternating data and hole, answered one stripe per call.
        fn block_status(&self, _: &MetaContext, offset: u64, _: u64) -> ExportResult<Vec<Extent>> {
            let stripe = offset / 4096;
            let flags = if stripe % 2 == 0 { 0 } else { 3 };
            Ok(vec![Extent {
                length: 4096 - offset % 4096,
                flags,
            }])
        }
    }

    #[test]
    fn short_answers_are_requeried_and_trimmed_to_the_range() {
        let e = collect_extents(
            &Striped,
            &MetaContext::BaseAllocation,
            1024,
            10_000,
            false,
            u64::MAX,
        )
        .unwrap();
        assert_eq!(e, vec![(3072, 0), (4096, 3), (2832, 0)]);
        assert_eq!(e.iter().map(|x| x.0).sum::<u64>(), 10_000);
    }

    #[test]
    fn req_one_returns_a_single_extent() {
        let e = collect_extents(
            &Striped,
            &MetaContext::BaseAllocation,
            0,
            1 << 20,
            true,
            u64::MAX,
        )
        .unwrap();
        assert_eq!(e, vec![(4096, 0)]);
    }

    #[test]
    fn extents_are_capped_per_chunk() {
        let e = collect_extents(
            &Striped,
            &MetaContext::BaseAllocation,
            0,
            1 << 20,
            false,
            u64::MAX,
        )
        .unwrap();
        assert_eq!(e.len(), 256);
        let capped = collect_extents(
            &Striped,
            &MetaContext::BaseAllocation,
            0,
            1 << 20,
            false,
            1000,
        )
        .unwrap();
        assert!(capped.iter().all(|&(len, _)| len <= 1000));
        assert_eq!(capped.iter().map(|x| x.0).sum::<u64>(), 1 << 20);
    }

    #[test]
    fn allocation_map_merges_into_runs() {
        let map = allocation_map(&Striped, 0, 16384).unwrap();
        assert_eq!(
            map,
            vec![(4096, false), (4096, true), (4096, false), (4096, true)]
        );
    }
}
