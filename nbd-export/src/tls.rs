//! NBD over TLS (STARTTLS, X.509 only) with rustls and its `ring` provider (the server's
//! record layer after the handshake is [`crate::record`], on the same provider's AEADs).
//!
//! The server reads QEMU's credential layout (`ca-cert.pem`, `server-cert.pem`,
//! `server-key.pem`, optional `ca-crl.pem`) so one directory serves qemu-nbd and tidemark
//! alike; the client reads libnbd's (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`).
//! TLS 1.3 and 1.2 with rustls' default (modern, forward-secret, AEAD-only) suites.
//!
//! Authorization ([`Authz`]) takes a client's identity as its certificate subject's
//! distinguished name in the RFC 4514 string form GnuTLS prints and qemu's authz objects
//! match (`CN=backup-host-1,O=Example,C=GB`), and a file in qemu's authz-list-file JSON
//! layout, each rule optionally scoped to export name globs:
//!
//! ```json
//! { "policy": "deny",
//!   "rules": [ { "match": "CN=backup-host-1,O=Example", "policy": "allow", "exports": ["*@backup"] },
//!              { "match": "CN=admin-*", "format": "glob", "policy": "allow" } ] }
//! ```
//!
//! External pre-shared keys (qemu's tls-creds-psk, nbdkit --tls-psk) are not supported:
//! rustls implements no external-PSK cipher suites.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

/// A TLS set-up failure: unreadable or unusable credentials or authz file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file is missing, unreadable or holds nothing usable.
    #[error("cannot read {path}: {reason}; TLS credential directories hold ca-cert.pem, server-cert.pem and server-key.pem (servers) or client-cert.pem and client-key.pem (clients)")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// rustls refused the credentials (key does not match, bad CA, bad CRL).
    #[error("TLS credentials in {dir} are unusable: {reason}")]
    Config {
        /// The credential directory.
        dir: PathBuf,
        /// rustls' reason.
        reason: String,
    },
    /// The authz file is unreadable or malformed.
    #[error("authorization file {path}: {reason}")]
    Authz {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A client TLS parameter is unusable.
    #[error("TLS client settings: {0}")]
    Client(String),
}

// ring (not aws-lc-rs, which needs cmake and nasm to build): its provider lacks only the
// post-quantum key exchange, for which rustls marks it deprecated.
#[allow(deprecated)]
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

fn pem_err(path: &Path, reason: impl ToString) -> TlsError {
    TlsError::Pem {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(path, e))?;
    if certs.is_empty() {
        return Err(pem_err(path, "no certificate in it"));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| pem_err(path, e))
}

fn read_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path)? {
        roots
            .add(cert)
            .map_err(|e| pem_err(path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// The server's TLS settings: the acceptor and the optional authorization list.
#[derive(Clone)]
pub struct TlsServer {
    config: Arc<rustls::ServerConfig>,
    authz: Option<Arc<Authz>>,
}

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsServer")
            .field("authz", &self.authz.is_some())
            .finish()
    }
}

impl TlsServer {
    /// Load QEMU's x509 layout from `dir`. With `verify_peer` a client must present a
    /// certificate signed by `ca-cert.pem` (and not revoked by `ca-crl.pem`, if present).
    pub fn from_dir(
        dir: &Path,
        verify_peer: bool,
        authz: Option<Authz>,
    ) -> Result<TlsServer, TlsError> {
        let config_err = |reason: String| TlsError::Config {
            dir: dir.to_path_buf(),
            reason,
        };
        if authz.is_some() && !verify_peer {
            return Err(config_err(
                "an authorization list needs client certificates: drop --tls-verify-peer=false"
                    .into(),
            ));
        }
        let certs = read_certs(&dir.join("server-cert.pem"))?;
        let key = read_key(&dir.join("server-key.pem"))?;
        let verifier = if verify_peer {
            let roots = read_roots(&dir.join("ca-cert.pem"))?;
            let crl_path = dir.join("ca-crl.pem");
            let crls = if crl_path.exists() {
                CertificateRevocationListDer::pem_file_iter(&crl_path)
                    .map_err(|e| pem_err(&crl_path, e))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| pem_err(&crl_path, e))?
            } else {
                Vec::new()
            };
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .with_crls(crls)
                .build()
                .map_err(|e| config_err(e.to_string()))?
        } else {
            WebPkiClientVerifier::no_client_auth()
        };
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)
            .map_err(|e| config_err(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .map_err(|e| config_err(e.to_string()))?;
        // No session resumption: every connection shows its certificate, so the CRL and
        // the authorization list judge each one. No NBD client resumes (libnbd and QEMU
        // start a fresh session per connection), so the two TLS 1.3 tickets rustls would
        // make, store and send per handshake were only cost.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(TlsServer {
            config: Arc::new(config),
            authz: authz.map(Arc::new),
        })
    }

    /// The rustls settings (each connection runs on a copy that captures its keys).
    pub(crate) fn config(&self) -> &rustls::ServerConfig {
        &self.config
    }

    /// Decide on a client by its certificate chain (leaf first), if it sent one: the
    /// export globs it may open (`None`: all), or why it is refused.
    pub fn authorize(&self, chain: Option<&[CertificateDer<'_>]>) -> Result<Scope, String> {
        let Some(authz) = &self.authz else {
            return Ok(Scope::All);
        };
        let leaf = chain
            .and_then(|c| c.first())
            .ok_or("no client certificate to authorize")?;
        let dn = subject_dn(leaf)?;
        authz
            .decide(&dn)
            .ok_or_else(|| format!("client identity {dn:?} is not in the authorization list"))
    }
}

/// Which exports an authorized client may open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every export.
    All,
    /// Exports whose names match one of these globs.
    Exports(Vec<String>),
}

impl Scope {
    /// Whether `export` is within the scope.
    pub fn allows(&self, export: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Exports(globs) => globs.iter().any(|g| glob_match(g, export)),
        }
    }
}

/// The subject of a DER certificate as an RFC 4514 string (most specific RDN first, the
/// form GnuTLS's gnutls_x509_crt_get_dn prints and qemu's authz matches).
pub fn subject_dn(der: &[u8]) -> Result<String, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("unparsable client certificate: {e}"))?;
    let registry = x509_parser::objects::oid_registry();
    let mut rdns = Vec::new();
    for rdn in cert.subject().iter_rdn() {
        let mut parts = Vec::new();
        for attr in rdn.iter() {
            let key = x509_parser::objects::oid2abbrev(attr.attr_type(), registry)
                .map(str::to_string)
                .unwrap_or_else(|_| attr.attr_type().to_id_string());
            let value = attr
                .as_str()
                .map_err(|_| format!("client certificate subject attribute {key} is not text"))?;
            parts.push(format!("{key}={}", escape_dn_value(value)));
        }
        rdns.push(parts.join("+"));
    }
    rdns.reverse();
    Ok(rdns.join(","))
}

fn escape_dn_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for (i, c) in value.chars().enumerate() {
        let edge = (i == 0 && (c == ' ' || c == '#')) || (i + 1 == value.len() && c == ' ');
        if edge || matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Shell-style glob with `*` and `?` (what qemu's authz "glob" format uses, fnmatch).
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// An authorization list: first matching rule wins, else the default policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authz {
    rules: Vec<Rule>,
    default_allow: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    pattern: String,
    glob: bool,
    allow: bool,
    exports: Option<Vec<String>>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthzFile {
    #[serde(default)]
    policy: Option<String>,
    #[serde(default)]
    rules: Vec<RuleFile>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    #[serde(rename = "match")]
    pattern: String,
    policy: String,
    #[serde(default)]
    format: Option<String>,
    #[serde(default)]
    exports: Option<Vec<String>>,
}

fn policy(text: &str) -> Result<bool, String> {
    match text {
        "allow" => Ok(true),
        "deny" => Ok(false),
        other => Err(format!(
            "policy {other:?} is neither \"allow\" nor \"deny\""
        )),
    }
}

impl Authz {
    /// Read and parse an authz-list-file JSON document.
    pub fn load(path: &Path) -> Result<Authz, TlsError> {
        let err = |reason: String| TlsError::Authz {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        Authz::parse(&text).map_err(err)
    }

    /// Parse an authz-list-file JSON document (see the module doc).
    pub fn parse(text: &str) -> Result<Authz, String> {
        let file: AuthzFile = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let default_allow = policy(file.policy.as_deref().unwrap_or("deny"))?;
        let rules = file
            .rules
            .into_iter()
            .map(|r| {
                let glob = match r.format.as_deref().unwrap_or("exact") {
                    "exact" => false,
                    "glob" => true,
                    other => {
                        return Err(format!(
                            "rule format {other:?} is neither \"exact\" nor \"glob\""
                        ))
                    }
                };
                Ok(Rule {
                    allow: policy(&r.policy)?,
                    pattern: r.pattern,
                    glob,
                    exports: r.exports,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Authz {
            rules,
            default_allow,
        })
    }

    /// The scope of identity `dn`, or `None` when it is denied.
    pub fn decide(&self, dn: &str) -> Option<Scope> {
        for rule in &self.rules {
            let hit = if rule.glob {
                glob_match(&rule.pattern, dn)
            } else {
                rule.pattern == dn
            };
            if hit {
                return rule.allow.then(|| match &rule.exports {
                    Some(globs) => Scope::Exports(globs.clone()),
                    None => Scope::All,
                });
            }
        }
        self.default_allow.then_some(Scope::All)
    }
}

/// A client's TLS settings, from libnbd's URI query parameters.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsParams {
    /// `tls-certificates=DIR`: ca-cert.pem, client-cert.pem, client-key.pem.
    pub certificates: Option<PathBuf>,
    /// `tls-verify-peer=false` turns off checking the server's certificate.
    pub verify_peer: bool,
    /// `tls-hostname=`: the name the server certificate must carry.
    pub hostname: Option<String>,
}

/// The connector and server name for a client connection.
pub(crate) fn client_connector(
    params: &TlsParams,
    default_host: &str,
) -> Result<(tokio_rustls::TlsConnector, ServerName<'static>), TlsError> {
    let err = |reason: String| TlsError::Client(reason);
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| err(e.to_string()))?;
    let builder = if params.verify_peer {
        let dir = params.certificates.as_ref().ok_or_else(|| {
            err("verifying the server needs tls-certificates=DIR with ca-cert.pem (or tls-verify-peer=false)".into())
        })?;
        builder.with_root_certificates(read_roots(&dir.join("ca-cert.pem"))?)
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoServerVerification(provider())))
    };
    let config = match &params.certificates {
        Some(dir) if dir.join("client-cert.pem").exists() => builder
            .with_client_auth_cert(
                read_certs(&dir.join("client-cert.pem"))?,
                read_key(&dir.join("client-key.pem"))?,
            )
            .map_err(|e| err(format!("client certificate in {}: {e}", dir.display())))?,
        _ => builder.with_no_client_auth(),
    };
    let host = params.hostname.as_deref().unwrap_or(default_host);
    let name = ServerName::try_from(host.to_string())
        .map_err(|_| err(format!("{host:?} is not a valid TLS server name")))?;
    Ok((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
}

/// `tls-verify-peer=false`: accept any server certificate, still checking that the
/// server holds its key.
#[derive(Debug)]
struct NoServerVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoServerVerification {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_never_resumed() {
        use crate::record::tests::{transfer, CERT, KEY};
        use rustls::{ClientConnection, Connection, ServerConnection};
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("server-cert.pem"), CERT).unwrap();
        std::fs::write(dir.path().join("server-key.pem"), KEY).unwrap();
        let server = TlsServer::from_dir(dir.path(), false, None).unwrap();
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(CERT.as_bytes()).unwrap())
            .unwrap();
        // A client that keeps tickets and offers them again: the second connection would
        // resume if the server issued any.
        let client = Arc::new(
            rustls::ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(VERSIONS)
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        );
        for round in 0..2 {
            let name = "localhost".try_into().unwrap();
            let mut c = Connection::Client(ClientConnection::new(client.clone(), name).unwrap());
            let config = Arc::new(server.config().clone());
            let mut s = Connection::Server(ServerConnection::new(config).unwrap());
            while c.is_handshaking() || s.is_handshaking() || s.wants_write() {
                transfer(&mut c, &mut s);
                transfer(&mut s, &mut c);
            }
            assert_eq!(
                c.handshake_kind(),
                Some(rustls::HandshakeKind::Full),
                "connection {round}"
            );
        }
    }

    #[test]
    fn globs_match_like_fnmatch() {
        assert!(glob_match("*@backup", "vm1@backup"));
        assert!(!glob_match("*@backup", "vm1"));
        assert!(glob_match("vm?", "vm1"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("a*b", "ac"));
        assert!(glob_match("a*b*c", "axxbyyc"));
    }

    #[test]
    fn authz_first_rule_wins_and_scopes_exports() {
        let authz = Authz::parse(
            r#"{"policy":"deny","rules":[
                {"match":"CN=host1","policy":"allow","exports":["*@backup"]},
                {"match":"CN=bad*","policy":"deny","format":"glob"},
                {"match":"CN=*","policy":"allow","format":"glob"}]}"#,
        )
        .unwrap();
        let host1 = authz.decide("CN=host1").unwrap();
        assert!(host1.allows("vm@backup"));
        assert!(!host1.allows("vm"));
        assert_eq!(authz.decide("CN=badhost"), None);
        assert_eq!(authz.decide("CN=other"), Some(Scope::All));
        assert_eq!(authz.decide("O=x"), None);
    }

    #[test]
    fn authz_rejects_malformed_files() {
        for bad in [
            "",
            "{\"policy\":\"maybe\"}",
            "{\"rules\":[{\"match\":\"x\",\"policy\":\"allow\",\"format\":\"regex\"}]}",
            "{\"rules\":[{\"match\":\"x\"}]}",
            "{\"rulez\":[]}",
        ] {
            assert!(Authz::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn dn_values_are_escaped() {
        assert_eq!(escape_dn_value("a,b"), "a\\,b");
        assert_eq!(escape_dn_value(" x "), "\\ x\\ ");
    }
}
