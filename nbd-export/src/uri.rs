//! NBD URIs (the NBD URI standard, as qemu-img and libnbd write them):
//! `nbd://HOST[:PORT]/[EXPORT]` and `nbd+unix:///[EXPORT]?socket=PATH`, and their TLS
//! forms `nbds://` and `nbds+unix://` with libnbd's query parameters
//! (`tls-certificates=DIR`, `tls-verify-peer=false`, `tls-hostname=NAME`).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::tls::TlsParams;

/// The default NBD TCP port.
pub const DEFAULT_PORT: u16 = 10809;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// TCP to a host and port.
    Tcp {
        /// Host name or address (IPv6 without brackets).
        host: String,
        /// Port.
        port: u16,
    },
    /// A Unix socket.
    Unix(PathBuf),
}

/// A parsed NBD URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// How to reach the server.
    pub transport: Transport,
    /// The export name (percent-decoded; empty for the default export).
    pub export: String,
    /// TLS settings for `nbds` URIs.
    pub tls: Option<TlsParams>,
}

/// A URI that is not an NBD URI we can use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid NBD URI {uri:?}: {reason} (expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)")]
pub struct UriError {
    uri: String,
    reason: String,
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Percent-encode `text` for a URI path or query value.
pub fn percent_encode(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/:@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl FromStr for NbdUri {
    type Err = UriError;

    fn from_str(uri: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| UriError {
            uri: uri.to_string(),
            reason: reason.to_string(),
        };
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| err("no scheme"))?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export =
            percent_decode(path).ok_or_else(|| err("bad percent-encoding in the export name"))?;
        let mut socket = None;
        let mut tls = TlsParams {
            verify_peer: true,
            ..TlsParams::default()
        };
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value =
                percent_decode(value).ok_or_else(|| err("bad percent-encoding in the query"))?;
            match key {
                "socket" => socket = Some(value),
                "tls-certificates" => tls.certificates = Some(PathBuf::from(value)),
                "tls-hostname" => tls.hostname = Some(value),
                "tls-verify-peer" => {
                    tls.verify_peer = match value.as_str() {
                        "true" | "1" | "yes" | "on" => true,
                        "false" | "0" | "no" | "off" => false,
                        _ => return Err(err("tls-verify-peer is true or false")),
                    }
                }
                k if k.starts_with("tls") => {
                    return Err(err(&format!(
                        "TLS parameter {k} is not supported (PSK is not available)"
                    )))
                }
                _ => {}
            }
        }
        let (scheme, tls) = match scheme {
            "nbds" => ("nbd", Some(tls)),
            "nbds+unix" => ("nbd+unix", Some(tls)),
            "nbd" | "nbd+unix"
                if tls
                    != TlsParams {
                        verify_peer: true,
                        ..TlsParams::default()
                    } =>
            {
                return Err(err("TLS parameters need an nbds:// or nbds+unix:// URI"))
            }
            other => (other, None),
        };
        let transport = match scheme {
            "nbd" => {
                if authority.is_empty() {
                    return Err(err("no host"));
                }
                let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
                    let (host, after) = v6
                        .split_once(']')
                        .ok_or_else(|| err("unclosed [ in host"))?;
                    (host, after.strip_prefix(':'))
                } else {
                    match authority.rsplit_once(':') {
                        Some((h, p)) => (h, Some(p)),
                        None => (authority, None),
                    }
                };
                let port = match port {
                    Some(p) => p.parse().map_err(|_| err("bad port"))?,
                    None => DEFAULT_PORT,
                };
                Transport::Tcp {
                    host: host.to_string(),
                    port,
                }
            }
            "nbd+unix" => {
                if !authority.is_empty() {
                    return Err(err("nbd+unix URIs have no host (use three slashes)"));
                }
                Transport::Unix(PathBuf::from(socket.ok_or_else(|| err("no ?socket=PATH"))?))
            }
            _ => return Err(err("unknown scheme")),
        };
        Ok(NbdUri {
            transport,
            export,
            tls,
        })
    }
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = if self.tls.is_some() { "s" } else { "" };
        let mut query = Vec::new();
        match &self.transport {
            Transport::Tcp { host, port } if host.contains(':') => write!(
                f,
                "nbd{s}://[{host}]:{port}/{}",
                percent_encode(&self.export)
            )?,
            Transport::Tcp { host, port } => {
                write!(f, "nbd{s}://{host}:{port}/{}", percent_encode(&self.export))?
            }
            Transport::Unix(path) => {
                write!(f, "nbd{s}+unix:///{}", percent_encode(&self.export))?;
                query.push(format!(
                    "socket={}",
                    percent_encode(&path.display().to_string())
                ));
            }
        }
        if let Some(tls) = &self.tls {
            if let Some(dir) = &tls.certificates {
                query.push(format!(
                    "tls-certificates={}",
                    percent_encode(&dir.display().to_string())
                ));
            }
            if let Some(host) = &tls.hostname {
                query.push(format!("tls-hostname={}", percent_encode(host)));
            }
            if !tls.verify_peer {
                query.push("tls-verify-peer=false".into());
            }
        }
        if !query.is_empty() {
            write!(f, "?{}", query.join("&"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcp_and_unix_uris() {
        let u: NbdUri = "nbd://example.com:1234/disk%20a".parse().unwrap();
        assert_eq!(
            u.transport,
            Transport::Tcp {
                host: "example.com".into(),
                port: 1234
            }
        );
        assert_eq!(u.export, "disk a");
        let u: NbdUri = "nbd://10.0.0.1".parse().unwrap();
        assert_eq!(
            u.transport,
            Transport::Tcp {
                host: "10.0.0.1".into(),
                port: DEFAULT_PORT
            }
        );
        assert_eq!(u.export, "");
        let u: NbdUri = "nbd://[::1]:99/x".parse().unwrap();
        assert_eq!(
            u.transport,
            Transport::Tcp {
                host: "::1".into(),
                port: 99
            }
        );
        let u: NbdUri = "nbd+unix:///vm1@backup?socket=/run/t/nbd.sock"
            .parse()
            .unwrap();
        assert_eq!(u.transport, Transport::Unix("/run/t/nbd.sock".into()));
        assert_eq!(u.export, "vm1@backup");
        let u: NbdUri = "nbd+unix://?socket=/s".parse().unwrap();
        assert_eq!(u.export, "");
    }

    #[test]
    fn parses_libnbd_tls_parameters() {
        let u: NbdUri = "nbds://127.0.0.1:10809/vm@backup?tls-certificates=/etc/pki/tidemark"
            .parse()
            .unwrap();
        let tls = u.tls.unwrap();
        assert_eq!(tls.certificates, Some(PathBuf::from("/etc/pki/tidemark")));
        assert!(tls.verify_peer);
        let u: NbdUri = "nbds+unix:///e?socket=/s&tls-verify-peer=false&tls-hostname=srv"
            .parse()
            .unwrap();
        assert_eq!(u.transport, Transport::Unix("/s".into()));
        let tls = u.tls.unwrap();
        assert!(!tls.verify_peer);
        assert_eq!(tls.hostname.as_deref(), Some("srv"));
        assert!("nbd://h/e".parse::<NbdUri>().unwrap().tls.is_none());
    }

    #[test]
    fn display_round_trips() {
        for text in [
            "nbd://h:1/a%20b",
            "nbd+unix:///e?socket=/tmp/a%20b.sock",
            "nbd://[::1]:5/",
            "nbds://h:1/e?tls-certificates=/etc/pki/a%20b&tls-hostname=h.example",
            "nbds+unix:///e?socket=/s&tls-verify-peer=false",
        ] {
            let u: NbdUri = text.parse().unwrap();
            assert_eq!(u.to_string().parse::<NbdUri>().unwrap(), u);
        }
    }

    #[test]
    fn rejects_what_it_cannot_serve() {
        for bad in [
            "http://x/",
            "nbd+unix:///e",
            "nbd://h/e?tls-certificates=/x",
            "nbds://h/e?tls-verify-peer=maybe",
            "nbds://h/e?tls-psk-file=/k",
            "nbd:///e",
            "nbd://h:port/",
            "nbd://h/%zz",
            "nbd+unix://host/e?socket=/s",
        ] {
            assert!(bad.parse::<NbdUri>().is_err(), "{bad} should be refused");
        }
    }
}
