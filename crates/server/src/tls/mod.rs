//! TLS for NBD connections: credentials ([`TlsConfig`]), the handshake after
//! `NBD_OPT_STARTTLS`, the peer's identity and its authorization, and the encrypted stream
//! the rest of the connection runs on ([`TlsStream`]).
//!
//! **When** TLS starts and which options need it is the protocol crate's decision
//! (`sluice_proto::nbd::tls`); this module only does what the negotiation machine asks for
//! with [`Event::StartTls`](sluice_proto::nbd::Event::StartTls): wrap the socket, run the
//! handshake, check the peer, and hand back a [`Stream`] that negotiation and transmission use
//! exactly as they use a plain socket.
//!
//! **Library: OpenSSL (the `openssl` crate), not rustls.** NBD's TLS peers are GnuTLS (libnbd,
//! qemu, nbdkit), and they authenticate in two ways: X.509 certificates and pre-shared keys
//! (psktool's `username:hexkey` files, `tls-creds-psk` in qemu, `--tls-psk` in nbdkit).
//! rustls has no TLS-PSK at all, so PSK users (the simple way to secure NBD between two
//! hosts) could not connect. OpenSSL has both, a server PSK callback that works for TLS 1.2
//! and 1.3 (OpenSSL maps the callback's key onto a TLS 1.3 external PSK with SHA-256, which is
//! what GnuTLS uses), and CRL checking. The `openssl` crate is built with its `vendored`
//! feature: OpenSSL 3 is compiled from source and linked statically, so building sluice needs
//! no libssl-dev and the binary carries the TLS library the tests ran with. The
//! integration tests check both methods against GnuTLS clients (libnbd, qemu).
//!
//! Settings match nbdkit's server: TLS 1.2 or later, no renegotiation, no session tickets or
//! cache (NBD connections are long-lived and clients do not resume), client certificates only
//! requested with `verify_peer` (then required, and checked against the CA and the CRL). An
//! X.509 server sends the CA's name in its certificate request so that clients holding
//! several certificates pick the right one, as GnuTLS servers do. The PSK file is read again
//! at every handshake, as GnuTLS does for nbdkit and qemu, so keys can be added or revoked
//! without a restart; it is also checked once when the configuration is built, so a
//! malformed file is reported at startup.
//!
//! The peer's identity ([`PeerIdentity`]: the X.509 distinguished name in the certificate's
//! order, as GnuTLS's `gnutls_x509_crt_get_dn` and so qemu's `authz` objects spell it, or the
//! PSK username) is passed to an optional authorization hook ([`TlsConfig::with_authz`])
//! after the handshake; a refused peer is disconnected before any NBD option is read over TLS.

mod psk;
mod stream;

pub use psk::PskFile;
pub use sluice_proto::nbd::TlsMode;
pub use stream::TlsStream;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use openssl::error::ErrorStack;
use openssl::ex_data::Index;
use openssl::pkey::PKey;
use openssl::ssl::{
    Ssl, SslContext, SslContextBuilder, SslFiletype, SslMethod, SslMode, SslOptions,
    SslSessionCacheMode, SslVerifyMode, SslVersion,
};
use openssl::stack::Stack;
use openssl::x509::store::X509Lookup;
use openssl::x509::verify::X509VerifyFlags;
use openssl::x509::{X509Crl, X509Name, X509NameRef, X509};

use crate::stream::Stream;

/// How long a client may take over the TLS handshake (GnuTLS's default, which nbdkit uses).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(40);

/// A TLS configuration problem: a credential file that is missing or malformed, or
/// credentials OpenSSL refuses. Each names the file (when there is one) and what is wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A credential file cannot be used.
    #[error("{}: {problem}", path.display())]
    File { path: PathBuf, problem: String },
    /// None of the searched directories holds a certificate set.
    #[error(
        "no TLS certificates found (looked for ca-cert.pem, server-cert.pem and \
         server-key.pem in {})",
        dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    NoCertificates { dirs: Vec<PathBuf> },
    /// OpenSSL refused a setting that does not come from a file.
    #[error("TLS setup failed: {0}")]
    Setup(String),
}

/// Why a connection's TLS upgrade failed (logged, then the connection is closed).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    #[error("TLS handshake timed out after {} s", HANDSHAKE_TIMEOUT.as_secs())]
    Timeout,
    #[error("TLS handshake failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS peer {0} is not authorized")]
    Denied(PeerIdentity),
}

impl HandshakeError {
    /// The client went away or did not speak TLS: worth a debug line, not more.
    pub fn is_disconnect(&self) -> bool {
        matches!(self, HandshakeError::Io(e) if matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::UnexpectedEof
        ))
    }
}

/// Who the client proved to be in the TLS handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerIdentity {
    /// The distinguished name of the client certificate in the certificate's order (for
    /// certtool-made certificates the least specific first, e.g. `C=GB,O=Example,CN=client1`),
    /// as GnuTLS prints it and qemu-storage-daemon's authz objects match (checked against
    /// qsd 10.0.2 in `tests/daemon_tls.rs`).
    X509(String),
    /// The PSK username the client used.
    Psk(String),
    /// No identity: an X.509 server without `verify_peer` does not ask for a certificate.
    Anonymous,
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerIdentity::X509(dn) => write!(f, "with certificate {dn:?}"),
            PeerIdentity::Psk(user) => write!(f, "with PSK username {user:?}"),
            PeerIdentity::Anonymous => f.write_str("without a certificate"),
        }
    }
}

/// Decides whether an authenticated peer may use the server (qsd's `tls-authz`).
pub type Authz = Arc<dyn Fn(&PeerIdentity) -> bool + Send + Sync>;

/// The files of an X.509 credential set: nbdkit's and qemu's names in one directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X509Files {
    /// CA certificate(s) that client certificates must chain to (`ca-cert.pem`).
    pub ca_cert: PathBuf,
    /// The server's certificate, possibly followed by intermediates (`server-cert.pem`).
    pub server_cert: PathBuf,
    /// The server certificate's private key (`server-key.pem`).
    pub server_key: PathBuf,
    /// A certificate revocation list checked when verifying clients (`ca-crl.pem`).
    pub ca_crl: Option<PathBuf>,
}

impl X509Files {
    /// The set in `dir`; `ca-crl.pem` is used if it exists. Missing files are reported by
    /// [`TlsConfig::x509`] (naming the file), so that a typo in a directory is not silently
    /// taken for "no TLS".
    pub fn in_dir(dir: &Path) -> X509Files {
        let crl = dir.join("ca-crl.pem");
        X509Files {
            ca_cert: dir.join("ca-cert.pem"),
            server_cert: dir.join("server-cert.pem"),
            server_key: dir.join("server-key.pem"),
            ca_crl: crl.exists().then_some(crl),
        }
    }

    /// True if the three required files exist (nbdkit's test for a certificate directory).
    pub fn is_complete(&self) -> bool {
        [&self.ca_cert, &self.server_cert, &self.server_key]
            .iter()
            .all(|p| p.is_file())
    }

    /// The first of `dirs` holding a complete set ([`X509Files::is_complete`]), as nbdkit
    /// searches its default directories.
    pub fn find(dirs: &[PathBuf]) -> Result<X509Files, TlsError> {
        dirs.iter()
            .map(|d| X509Files::in_dir(d))
            .find(X509Files::is_complete)
            .ok_or_else(|| TlsError::NoCertificates {
                dirs: dirs.to_vec(),
            })
    }
}

/// How clients authenticate.
#[derive(Clone)]
enum Method {
    X509 {
        verify_peer: bool,
    },
    /// The keys file is held by the context's PSK callback.
    Psk,
}

/// A server's TLS settings: the mode, credentials loaded into an OpenSSL context, and an
/// optional authorization hook. Built once, shared by every connection.
#[derive(Clone)]
pub struct TlsConfig {
    mode: TlsMode,
    method: Method,
    ctx: SslContext,
    authz: Option<Authz>,
    /// What the credentials are, for log lines.
    describe: String,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("mode", &self.mode)
            .field("credentials", &self.describe)
            .field("authz", &self.authz.is_some())
            .finish()
    }
}

impl TlsConfig {
    /// X.509 credentials from `files`. With `verify_peer`, clients must present a certificate
    /// that chains to the CA (and is not revoked, if a CRL is given); otherwise none is asked
    /// for, as with nbdkit without `--tls-verify-peer`.
    pub fn x509(
        mode: TlsMode,
        files: &X509Files,
        verify_peer: bool,
    ) -> Result<TlsConfig, TlsError> {
        let cas = read_certs(&files.ca_cert, "CA certificate")?;
        let chain = read_certs(&files.server_cert, "certificate")?;
        let key_pem = read_file(&files.server_key)?;
        let key = PKey::private_key_from_pem(&key_pem).map_err(|e| TlsError::File {
            path: files.server_key.clone(),
            problem: format!("not a PEM private key ({})", reason(&e)),
        })?;
        let crl = match &files.ca_crl {
            Some(path) => {
                let pem = read_file(path)?;
                X509Crl::from_pem(&pem).map_err(|e| TlsError::File {
                    path: path.clone(),
                    problem: format!("not a PEM certificate revocation list ({})", reason(&e)),
                })?;
                Some(path)
            }
            None => None,
        };

        let mut b = base_context()?;
        let mut chain = chain.into_iter();
        let leaf = chain.next().expect("read_certs returns at least one");
        b.set_certificate(&leaf).map_err(|e| TlsError::File {
            path: files.server_cert.clone(),
            problem: format!("certificate refused ({})", reason(&e)),
        })?;
        for extra in chain {
            b.add_extra_chain_cert(extra).map_err(setup)?;
        }
        let mismatch = || TlsError::File {
            path: files.server_key.clone(),
            problem: format!(
                "does not match the certificate in {}",
                files.server_cert.display()
            ),
        };
        if !leaf.public_key().is_ok_and(|public| public.public_eq(&key)) {
            return Err(mismatch());
        }
        b.set_private_key(&key).map_err(|e| TlsError::File {
            path: files.server_key.clone(),
            problem: format!("key refused ({})", reason(&e)),
        })?;
        b.check_private_key().map_err(|_| mismatch())?;
        let mut names = Stack::<X509Name>::new().map_err(setup)?;
        for ca in cas {
            names
                .push(ca.subject_name().to_owned().map_err(setup)?)
                .map_err(setup)?;
            b.cert_store_mut().add_cert(ca).map_err(setup)?;
        }
        if verify_peer {
            b.set_client_ca_list(names);
            b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
            if let Some(path) = crl {
                let store = b.cert_store_mut();
                store
                    .add_lookup(X509Lookup::file())
                    .and_then(|l| l.load_crl_file(path, SslFiletype::PEM))
                    .map_err(|e| TlsError::File {
                        path: path.clone(),
                        problem: format!("certificate revocation list refused ({})", reason(&e)),
                    })?;
                store.set_flags(X509VerifyFlags::CRL_CHECK).map_err(setup)?;
            }
        } else {
            b.set_verify(SslVerifyMode::NONE);
        }
        let describe = format!(
            "X.509 certificate {}{}",
            files.server_cert.display(),
            if verify_peer {
                ", client certificates verified"
            } else {
                ""
            }
        );
        Ok(TlsConfig {
            mode,
            method: Method::X509 { verify_peer },
            ctx: b.build(),
            authz: None,
            describe,
        })
    }

    /// Pre-shared keys from `file` (psktool's `username:hexkey` lines), checked now and read
    /// again at every handshake.
    pub fn psk(mode: TlsMode, file: &Path) -> Result<TlsConfig, TlsError> {
        let keys = PskFile::open(file)?;
        let mut b = base_context()?;
        // TLS 1.2 PSK suites (TLS 1.3 uses the callback with its own suites).
        b.set_cipher_list("ECDHE-PSK:DHE-PSK:PSK:!eNULL")
            .map_err(setup)?;
        b.set_verify(SslVerifyMode::NONE);
        let index = psk_user_index()?;
        b.set_psk_server_callback(move |ssl, identity, out| {
            let Some(identity) = identity else {
                return Ok(0);
            };
            let len = keys.key_into(identity, out).unwrap_or(0);
            if len > 0 {
                // OpenSSL does not keep a TLS 1.3 external PSK's identity for
                // SSL_get_psk_identity, so the callback records who it let in.
                let user = String::from_utf8_lossy(identity).into_owned();
                ssl.set_ex_data(index, user);
            }
            Ok(len)
        });
        Ok(TlsConfig {
            mode,
            method: Method::Psk,
            ctx: b.build(),
            authz: None,
            describe: format!("pre-shared keys in {}", file.display()),
        })
    }

    /// Adds an authorization check, run after every successful handshake with the peer's
    /// identity: false disconnects the client.
    pub fn with_authz(mut self, authz: Authz) -> TlsConfig {
        self.authz = Some(authz);
        self
    }

    /// Whether TLS is optional (`On`) or required (`Require`).
    pub fn mode(&self) -> TlsMode {
        self.mode
    }

    /// True for pre-shared keys, false for X.509.
    pub fn is_psk(&self) -> bool {
        matches!(self.method, Method::Psk)
    }

    /// A short description of the credentials, for log lines.
    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// Runs the TLS handshake on `stream` (the plaintext socket, just after the
    /// `NBD_REP_ACK` to `NBD_OPT_STARTTLS` was sent), checks the peer, and returns the
    /// encrypted stream with the peer's identity.
    pub fn accept(&self, stream: Stream) -> Result<(Stream, PeerIdentity), HandshakeError> {
        let tls = TlsStream::accept(&self.ctx, stream, HANDSHAKE_TIMEOUT)?;
        let identity = tls.with_ssl(|ssl| match &self.method {
            Method::Psk => psk_user_index()
                .ok()
                .and_then(|i| ssl.ex_data(i).cloned())
                .map(PeerIdentity::Psk)
                .unwrap_or(PeerIdentity::Anonymous),
            Method::X509 { .. } => ssl
                .peer_certificate()
                .map(|c| PeerIdentity::X509(distinguished_name(c.subject_name())))
                .unwrap_or(PeerIdentity::Anonymous),
        });
        if let Method::X509 { verify_peer: true } = self.method {
            // OpenSSL already refused unverified certificates (FAIL_IF_NO_PEER_CERT); this
            // guards against a configuration change ever making it lenient.
            if identity == PeerIdentity::Anonymous {
                return Err(HandshakeError::Denied(identity));
            }
        }
        if let Some(authz) = &self.authz {
            if !authz(&identity) {
                return Err(HandshakeError::Denied(identity));
            }
        }
        tracing::debug!("TLS {} established, peer {identity}", tls.describe());
        Ok((Stream::Tls(Arc::new(tls)), identity))
    }
}

/// Where the PSK callback records the username it accepted, on each session.
fn psk_user_index() -> Result<Index<Ssl, String>, TlsError> {
    static INDEX: OnceLock<Result<Index<Ssl, String>, String>> = OnceLock::new();
    INDEX
        .get_or_init(|| Ssl::new_ex_index().map_err(|e| reason(&e)))
        .clone()
        .map_err(TlsError::Setup)
}

/// Settings every context shares (see the module doc).
fn base_context() -> Result<SslContextBuilder, TlsError> {
    let mut b = SslContext::builder(SslMethod::tls_server()).map_err(setup)?;
    b.set_min_proto_version(Some(SslVersion::TLS1_2))
        .map_err(setup)?;
    b.set_options(
        SslOptions::NO_RENEGOTIATION
            | SslOptions::NO_TICKET
            | SslOptions::CIPHER_SERVER_PREFERENCE
            // A client that closes without close_notify has simply gone (NBD frames its own
            // messages, so truncation is detected above TLS).
            | SslOptions::IGNORE_UNEXPECTED_EOF,
    );
    b.set_num_tickets(0).map_err(setup)?;
    // The server picks (AES-GCM first: hardware-accelerated where NBD servers run); a TLS 1.3
    // PSK needs a SHA-256 suite, so AES-128-GCM is next rather than ChaCha20.
    b.set_ciphersuites(
        "TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256",
    )
    .map_err(setup)?;
    b.set_session_cache_mode(SslSessionCacheMode::OFF);
    b.set_mode(SslMode::ENABLE_PARTIAL_WRITE | SslMode::ACCEPT_MOVING_WRITE_BUFFER);
    Ok(b)
}

fn setup(e: ErrorStack) -> TlsError {
    TlsError::Setup(reason(&e))
}

/// The first OpenSSL reason in an error stack ("no start line", "key values mismatch"),
/// which is what a user can act on; the rest is OpenSSL's internals.
pub(crate) fn reason(e: &ErrorStack) -> String {
    e.errors()
        .iter()
        .find_map(|e| e.reason())
        .unwrap_or("unknown OpenSSL error")
        .to_string()
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::File {
        path: path.to_path_buf(),
        problem: format!("cannot read: {}", io_reason(&e)),
    })
}

/// An I/O error without Rust's " (os error N)" suffix.
fn io_reason(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Every PEM certificate in `path` (at least one).
fn read_certs(path: &Path, what: &str) -> Result<Vec<X509>, TlsError> {
    let pem = read_file(path)?;
    let certs = X509::stack_from_pem(&pem).map_err(|e| TlsError::File {
        path: path.to_path_buf(),
        problem: format!("not a PEM {what} ({})", reason(&e)),
    })?;
    if certs.is_empty() {
        return Err(TlsError::File {
            path: path.to_path_buf(),
            problem: format!("no PEM {what} in it"),
        });
    }
    Ok(certs)
}

/// `name` as GnuTLS's `gnutls_x509_crt_get_dn` prints it, which is what qemu's authz objects
/// match: the RDNs in the certificate's order (not RFC 4514's reversed one), `SN=value` joined
/// by commas, with the special characters escaped.
fn distinguished_name(name: &X509NameRef) -> String {
    let parts: Vec<String> = name
        .entries()
        .map(|e| {
            let key = e.object().nid().short_name().unwrap_or("?");
            let value = e.data().to_string().unwrap_or_default();
            format!("{key}={}", escape_rdn_value(&value))
        })
        .collect();
    parts.join(",")
}

/// RFC 4514 section 2.4 escaping.
fn escape_rdn_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let last = v.chars().count().saturating_sub(1);
    for (i, c) in v.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_rdn_value_escapes_specials_and_edge_spaces() {
        assert_eq!(escape_rdn_value("a,b+c"), "a\\,b\\+c");
        assert_eq!(escape_rdn_value(" x "), "\\ x\\ ");
        assert_eq!(escape_rdn_value("#x"), "\\#x");
        assert_eq!(escape_rdn_value("plain"), "plain");
    }

    #[test]
    fn distinguished_name_keeps_the_certificate_order() {
        let mut b = X509Name::builder().unwrap();
        b.append_entry_by_text("C", "GB").unwrap();
        b.append_entry_by_text("O", "Example, Ltd").unwrap();
        b.append_entry_by_text("CN", "client1").unwrap();
        let name = b.build();
        assert_eq!(
            distinguished_name(&name),
            "C=GB,O=Example\\, Ltd,CN=client1"
        );
    }

    #[test]
    fn x509_missing_file_names_it() {
        let dir = std::env::temp_dir().join(format!("sluice-tls-none-{}", std::process::id()));
        let files = X509Files::in_dir(&dir);
        let err = TlsConfig::x509(TlsMode::On, &files, false).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("ca-cert.pem: cannot read: No such file or directory"),
            "{msg}"
        );
    }

    const KEY: [u8; 32] = [7; 32];

    /// A PSK file for `alice` with [`KEY`], in a fresh directory.
    fn psk_file(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sluice-tls-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys.psk");
        let hex: String = KEY.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(&path, format!("alice:{hex}\n")).unwrap();
        path
    }

    /// An OpenSSL PSK client (TLS 1.3) for `user` with [`KEY`], on `sock`, in a thread.
    fn psk_client<R: Send + 'static>(
        sock: std::os::unix::net::UnixStream,
        user: &'static str,
        then: impl FnOnce(&mut openssl::ssl::SslStream<std::os::unix::net::UnixStream>) -> R
            + Send
            + 'static,
    ) -> std::thread::JoinHandle<Option<R>> {
        std::thread::spawn(move || {
            let mut b = SslContext::builder(SslMethod::tls_client()).unwrap();
            b.set_verify(SslVerifyMode::NONE);
            b.set_psk_client_callback(move |_, _, identity, psk| {
                identity[..user.len()].copy_from_slice(user.as_bytes());
                identity[user.len()] = 0;
                psk[..KEY.len()].copy_from_slice(&KEY);
                Ok(KEY.len())
            });
            let ssl = Ssl::new(&b.build()).unwrap();
            let mut s = ssl.connect(sock).ok()?;
            Some(then(&mut s))
        })
    }

    #[test]
    fn psk_authz_sees_username_and_can_refuse() {
        let path = psk_file("authz");
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        let config = TlsConfig::psk(TlsMode::Require, &path)
            .unwrap()
            .with_authz(Arc::new(move |id: &PeerIdentity| {
                log.lock().unwrap().push(id.clone());
                false
            }));
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let client = psk_client(b, "alice", |_| ());
        let err = config.accept(Stream::unix(a)).unwrap_err();
        assert!(
            matches!(&err, HandshakeError::Denied(PeerIdentity::Psk(u)) if u == "alice"),
            "{err}"
        );
        assert_eq!(
            *seen.lock().unwrap(),
            vec![PeerIdentity::Psk("alice".into())]
        );
        let _ = client.join();
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn psk_unknown_user_fails_handshake() {
        let path = psk_file("unknown");
        let config = TlsConfig::psk(TlsMode::Require, &path).unwrap();
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let client = psk_client(b, "mallory", |_| ());
        assert!(config.accept(Stream::unix(a)).is_err());
        assert!(client.join().unwrap().is_none(), "client got through");
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    /// The stream is read and written by two threads at once, and a writer blocked on a
    /// full socket does not hold the session: the client first sends everything (the server's
    /// reader must drain it while its writer is stuck), then reads everything.
    #[test]
    fn stream_reader_and_writer_threads_do_not_block_each_other() {
        use std::io::{Read, Write};
        const LEN: usize = 8 << 20;
        let path = psk_file("duplex");
        let config = TlsConfig::psk(TlsMode::Require, &path).unwrap();
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let client = psk_client(b, "alice", |s| {
            s.write_all(&vec![0x11; LEN]).unwrap();
            let mut got = vec![0u8; LEN];
            s.read_exact(&mut got).unwrap();
            got.iter().all(|&b| b == 0x22)
        });
        let (stream, identity) = config.accept(Stream::unix(a)).unwrap();
        assert_eq!(identity, PeerIdentity::Psk("alice".into()));
        let mut writer = stream.try_clone().unwrap();
        let w = std::thread::spawn(move || writer.write_all(&vec![0x22; LEN]));
        let mut reader = stream;
        let mut got = vec![0u8; LEN];
        reader.read_exact(&mut got).unwrap();
        assert!(got.iter().all(|&b| b == 0x11));
        w.join().unwrap().unwrap();
        assert_eq!(client.join().unwrap(), Some(true));
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn x509_files_find_reports_every_directory() {
        let err = X509Files::find(&["/nonexistent/a".into(), "/nonexistent/b".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/a, /nonexistent/b"), "{err}");
    }
}
