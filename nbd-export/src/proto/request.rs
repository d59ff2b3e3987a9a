//! Transmission requests, client to server, in compact and extended headers.

use std::fmt;

use super::*;

/// Command codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// NBD_CMD_READ.
    Read,
    /// NBD_CMD_WRITE.
    Write,
    /// NBD_CMD_DISC.
    Disc,
    /// NBD_CMD_FLUSH.
    Flush,
    /// NBD_CMD_TRIM.
    Trim,
    /// NBD_CMD_CACHE.
    Cache,
    /// NBD_CMD_WRITE_ZEROES.
    WriteZeroes,
    /// NBD_CMD_BLOCK_STATUS.
    BlockStatus,
    /// Anything else (answered with EINVAL).
    Unknown(u16),
}

impl Command {
    /// From the wire value.
    pub fn from_wire(value: u16) -> Command {
        match value {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disc,
            3 => Command::Flush,
            4 => Command::Trim,
            5 => Command::Cache,
            6 => Command::WriteZeroes,
            7 => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }

    /// The wire value.
    pub fn to_wire(self) -> u16 {
        match self {
            Command::Read => 0,
            Command::Write => 1,
            Command::Disc => 2,
            Command::Flush => 3,
            Command::Trim => 4,
            Command::Cache => 5,
            Command::WriteZeroes => 6,
            Command::BlockStatus => 7,
            Command::Unknown(other) => other,
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Command::Read => "READ",
            Command::Write => "WRITE",
            Command::Disc => "DISC",
            Command::Flush => "FLUSH",
            Command::Trim => "TRIM",
            Command::Cache => "CACHE",
            Command::WriteZeroes => "WRITE_ZEROES",
            Command::BlockStatus => "BLOCK_STATUS",
            Command::Unknown(code) => return write!(f, "unknown command {code}"),
        };
        f.write_str(name)
    }
}

/// A request header, compact or extended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (see [`cflags`]).
    pub flags: u16,
    /// The command.
    pub command: Command,
    /// The client's cookie, echoed in the reply.
    pub cookie: u64,
    /// Offset in the export.
    pub offset: u64,
    /// Length (32 bits in compact headers).
    pub length: u64,
}

/// Parse a request header; `extended` selects the 32-byte form.
pub fn parse_request(bytes: &[u8], extended: bool) -> Result<Request, ProtoError> {
    let mut r = Reader::new(bytes, "request header");
    let magic = r.u32()?;
    let expected = if extended {
        EXTENDED_REQUEST_MAGIC
    } else {
        REQUEST_MAGIC
    };
    if magic != expected {
        return Err(ProtoError::BadMagic {
            what: "request header",
            found: magic.into(),
            expected: expected.into(),
        });
    }
    let flags = r.u16()?;
    let command = Command::from_wire(r.u16()?);
    let cookie = r.u64()?;
    let offset = r.u64()?;
    let length = if extended { r.u64()? } else { r.u32()?.into() };
    Ok(Request {
        flags,
        command,
        cookie,
        offset,
        length,
    })
}

/// Append a request header (client side); the length must fit 32 bits unless `extended`.
pub fn encode_request(out: &mut Vec<u8>, request: &Request, extended: bool) {
    put_u32(
        out,
        if extended {
            EXTENDED_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        },
    );
    put_u16(out, request.flags);
    put_u16(out, request.command.to_wire());
    put_u64(out, request.cookie);
    put_u64(out, request.offset);
    if extended {
        put_u64(out, request.length);
    } else {
        put_u32(out, request.length as u32);
    }
}

#[cfg(test)]
mod tests {
    use crate::proto::*;

    #[test]
    fn requests_round_trip_in_both_header_modes() {
        let req = Request {
            flags: cflags::FUA,
            command: Command::Write,
            cookie: 7,
            offset: 4096,
            length: 512,
        };
        for extended in [false, true] {
            let mut out = Vec::new();
            encode_request(&mut out, &req, extended);
            assert_eq!(out.len(), if extended { 32 } else { 28 });
            assert_eq!(parse_request(&out, extended).unwrap(), req);
            // The other mode's magic is refused.
            assert!(matches!(
                parse_request(&out, !extended),
                Err(ProtoError::BadMagic { .. }) | Err(ProtoError::Truncated { .. })
            ));
        }
    }
}
