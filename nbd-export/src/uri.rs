//! NBD URIs (the NBD URI standard, as qemu-img and libnbd write them):
//! `nbd://HOST[:PORT]/[EXPORT]` and `nbd+unix:///[EXPORT]?socket=PATH`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

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
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value =
                percent_decode(value).ok_or_else(|| err("bad percent-encoding in the query"))?;
            match key {
                "socket" => socket = Some(value),
                // tls-certificates and friends: TLS is not supported yet.
                k if k.starts_with("tls") => return Err(err("TLS parameters are not supported")),
                _ => {}
            }
        }
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
            "nbds" | "nbds+unix" => return Err(err("TLS (nbds) is not supported yet")),
            _ => return Err(err("unknown scheme")),
        };
        Ok(NbdUri { transport, export })
    }
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.transport {
            Transport::Tcp { host, port } if host.contains(':') => {
                write!(f, "nbd://[{host}]:{port}/{}", percent_encode(&self.export))
            }
            Transport::Tcp { host, port } => {
                write!(f, "nbd://{host}:{port}/{}", percent_encode(&self.export))
            }
            Transport::Unix(path) => write!(
                f,
                "nbd+unix:///{}?socket={}",
                percent_encode(&self.export),
                percent_encode(&path.display().to_string())
            ),
        }
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
    fn display_round_trips() {
        for text in [
            "nbd://h:1/a%20b",
            "nbd+unix:///e?socket=/tmp/a%20b.sock",
            "nbd://[::1]:5/",
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
            "nbds://h/e",
            "nbd:///e",
            "nbd://h:port/",
            "nbd://h/%zz",
            "nbd+unix://host/e?socket=/s",
        ] {
            assert!(bad.parse::<NbdUri>().is_err(), "{bad} should be refused");
        }
    }
}
