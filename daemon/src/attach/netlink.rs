//! Generic netlink, as small as the nbd front end needs: encode one request, parse the
//! kernel's answers, resolve a family by name. Written by hand on a rustix socket (no
//! netlink crate: four message shapes do not justify one).
//!
//! ```text
//! nlmsghdr  (16): u32 length | u16 type (family id) | u16 flags | u32 seq | u32 port
//! genlmsghdr (4): u8 cmd | u8 version | u16 reserved
//! nlattr     (4): u16 length (header included) | u16 type (| NLA_F_NESTED), payload,
//!                 padded to 4 bytes
//! ```
//! All fields are in host byte order.

use std::io;
use std::os::fd::OwnedFd;

use rustix::net::netlink::{self, SocketAddrNetlink};
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketType};

const NLMSG_HDRLEN: usize = 16;
const GENL_HDRLEN: usize = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
/// Marks an attribute whose payload is more attributes.
pub const NLA_F_NESTED: u16 = 0x8000;

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;

/// Parsed attributes: (type without flags, payload) pairs, in order.
pub type Attrs = Vec<(u16, Vec<u8>)>;

/// One attribute to encode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attr {
    /// A u32 payload.
    U32(u16, u32),
    /// A u64 payload.
    U64(u16, u64),
    /// A NUL-terminated string payload.
    Str(u16, String),
    /// Nested attributes (the type gets NLA_F_NESTED).
    Nested(u16, Vec<Attr>),
}

fn put_attrs(out: &mut Vec<u8>, attrs: &[Attr]) {
    for attr in attrs {
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        let kind = match attr {
            Attr::U32(kind, v) => {
                out.extend_from_slice(&v.to_ne_bytes());
                *kind
            }
            Attr::U64(kind, v) => {
                out.extend_from_slice(&v.to_ne_bytes());
                *kind
            }
            Attr::Str(kind, s) => {
                out.extend_from_slice(s.as_bytes());
                out.push(0);
                *kind
            }
            Attr::Nested(kind, inner) => {
                put_attrs(out, inner);
                *kind | NLA_F_NESTED
            }
        };
        let len = (out.len() - start) as u16;
        out[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        out[start + 2..start + 4].copy_from_slice(&kind.to_ne_bytes());
        out.resize(out.len().next_multiple_of(4), 0);
    }
}

/// A generic netlink request asking for an acknowledgement.
pub fn encode_request(family: u16, cmd: u8, version: u8, seq: u32, attrs: &[Attr]) -> Vec<u8> {
    let mut out = vec![0u8; NLMSG_HDRLEN];
    out.extend_from_slice(&[cmd, version, 0, 0]);
    put_attrs(&mut out, attrs);
    let len = out.len() as u32;
    out[0..4].copy_from_slice(&len.to_ne_bytes());
    out[4..6].copy_from_slice(&family.to_ne_bytes());
    out[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    out[8..12].copy_from_slice(&seq.to_ne_bytes());
    out
}

/// One message of the kernel's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// NLMSG_ERROR: 0 is the acknowledgement, otherwise a negative errno.
    Ack {
        /// The sequence number answered.
        seq: u32,
        /// 0 or a negative errno.
        error: i32,
    },
    /// A generic netlink message with its top-level attributes.
    Message {
        /// The sequence number answered.
        seq: u32,
        /// The command.
        cmd: u8,
        /// Its top-level attributes.
        attrs: Attrs,
    },
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The attributes in `bytes`; `None` if one runs past the end.
pub fn parse_attrs(mut bytes: &[u8]) -> Option<Attrs> {
    let mut attrs = Vec::new();
    while bytes.len() >= 4 {
        let len = usize::from(u16_at(bytes, 0)?);
        let kind = u16_at(bytes, 2)? & !NLA_F_NESTED;
        if len < 4 || len > bytes.len() {
            return None;
        }
        attrs.push((kind, bytes[4..len].to_vec()));
        bytes = bytes.get(len.next_multiple_of(4)..).unwrap_or(&[]);
    }
    Some(attrs)
}

/// Every message in one datagram from the kernel; `None` for a malformed one.
pub fn parse_answers(mut bytes: &[u8]) -> Option<Vec<Answer>> {
    let mut answers = Vec::new();
    while bytes.len() >= NLMSG_HDRLEN {
        let len = u32_at(bytes, 0)? as usize;
        if len < NLMSG_HDRLEN || len > bytes.len() {
            return None;
        }
        let kind = u16_at(bytes, 4)?;
        let seq = u32_at(bytes, 8)?;
        let body = &bytes[NLMSG_HDRLEN..len];
        match kind {
            NLMSG_ERROR => answers.push(Answer::Ack {
                seq,
                error: u32_at(body, 0)? as i32,
            }),
            NLMSG_DONE => {}
            _ => answers.push(Answer::Message {
                seq,
                cmd: *body.first()?,
                attrs: parse_attrs(body.get(GENL_HDRLEN..)?)?,
            }),
        }
        bytes = bytes.get(len.next_multiple_of(4)..).unwrap_or(&[]);
    }
    Some(answers)
}

/// A generic netlink socket.
#[derive(Debug)]
pub struct GenlSocket {
    fd: OwnedFd,
    seq: u32,
}

impl GenlSocket {
    /// A socket bound to a kernel-chosen port.
    pub fn open() -> io::Result<GenlSocket> {
        let fd = rustix::net::socket(
            AddressFamily::NETLINK,
            SocketType::RAW,
            Some(netlink::GENERIC),
        )?;
        rustix::net::bind(&fd, &SocketAddrNetlink::new(0, 0))?;
        Ok(GenlSocket { fd, seq: 0 })
    }

    /// Send one request and collect the messages answering it up to its acknowledgement;
    /// a negative acknowledgement is that errno.
    pub fn request(
        &mut self,
        family: u16,
        cmd: u8,
        version: u8,
        attrs: &[Attr],
    ) -> io::Result<Vec<Attrs>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let message = encode_request(family, cmd, version, seq, attrs);
        rustix::net::send(&self.fd, &message, SendFlags::empty())?;
        let mut replies = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let (got, _) = rustix::net::recv(&self.fd, &mut buf[..], RecvFlags::empty())?;
            let answers = parse_answers(&buf[..got]).ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, "malformed netlink answer")
            })?;
            for answer in answers {
                match answer {
                    Answer::Ack { seq: s, error } if s == seq => {
                        return match error {
                            0 => Ok(replies),
                            e => Err(io::Error::from_raw_os_error(-e)),
                        };
                    }
                    Answer::Message { seq: s, attrs, .. } if s == seq => replies.push(attrs),
                    // Stale answers to an earlier request.
                    _ => {}
                }
            }
        }
    }

    /// The id of the generic netlink family `name`, or `None` when the kernel has none
    /// (its module is not loaded).
    pub fn resolve(&mut self, name: &str) -> io::Result<Option<u16>> {
        let attrs = [Attr::Str(CTRL_ATTR_FAMILY_NAME, name.to_string())];
        match self.request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 2, &attrs) {
            Ok(replies) => Ok(replies
                .iter()
                .flatten()
                .find(|(kind, _)| *kind == CTRL_ATTR_FAMILY_ID)
                .and_then(|(_, v)| Some(u16::from_ne_bytes(v.get(..2)?.try_into().ok()?)))),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_carry_header_padding_and_nested_attributes() {
        let msg = encode_request(
            0x1c,
            1,
            1,
            7,
            &[
                Attr::Str(2, "nbd".into()),
                Attr::Nested(7, vec![Attr::U32(1, 5)]),
            ],
        );
        let mut want = Vec::new();
        want.extend_from_slice(&40u32.to_ne_bytes());
        want.extend_from_slice(&0x1cu16.to_ne_bytes());
        want.extend_from_slice(&5u16.to_ne_bytes());
        want.extend_from_slice(&7u32.to_ne_bytes());
        want.extend_from_slice(&0u32.to_ne_bytes());
        want.extend_from_slice(&[1, 1, 0, 0]);
        want.extend_from_slice(&8u16.to_ne_bytes());
        want.extend_from_slice(&2u16.to_ne_bytes());
        want.extend_from_slice(b"nbd\0");
        want.extend_from_slice(&12u16.to_ne_bytes());
        want.extend_from_slice(&(7 | NLA_F_NESTED).to_ne_bytes());
        want.extend_from_slice(&8u16.to_ne_bytes());
        want.extend_from_slice(&1u16.to_ne_bytes());
        want.extend_from_slice(&5u32.to_ne_bytes());
        assert_eq!(msg, want);
    }

    #[test]
    fn answers_parse_back_including_errors_and_padding() {
        let mut datagram = encode_request(0x1c, 5, 1, 3, &[Attr::Str(9, "ab".into())]);
        let mut error = vec![0u8; 16];
        error[0..4].copy_from_slice(&36u32.to_ne_bytes());
        error[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        error[8..12].copy_from_slice(&3u32.to_ne_bytes());
        error.extend_from_slice(&(-libc::ENOENT).to_ne_bytes());
        error.extend_from_slice(&[0; 16]);
        datagram.extend_from_slice(&error);
        let answers = parse_answers(&datagram).unwrap();
        assert_eq!(
            answers,
            vec![
                Answer::Message {
                    seq: 3,
                    cmd: 5,
                    attrs: vec![(9, b"ab\0".to_vec())],
                },
                Answer::Ack {
                    seq: 3,
                    error: -libc::ENOENT,
                },
            ]
        );
    }

    #[test]
    fn truncated_answers_are_refused_not_read_past() {
        let msg = encode_request(0x1c, 5, 1, 3, &[Attr::U64(2, 1)]);
        assert_eq!(parse_answers(&msg[..msg.len() - 2]), None);
        assert_eq!(parse_attrs(&[12, 0, 1, 0, 0, 0]), None);
    }

    #[test]
    fn a_family_the_kernel_lacks_resolves_to_none() {
        // Family names are at most 15 bytes (GENL_NAMSIZ); longer ones are EINVAL.
        let mut socket = GenlSocket::open().unwrap();
        assert_eq!(socket.resolve("tidemark-none").unwrap(), None);
        assert!(socket.resolve("nlctrl").unwrap().is_some());
    }
}
