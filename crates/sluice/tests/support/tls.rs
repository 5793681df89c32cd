//! TLS fixtures for the integration tests: a small PKI and PSK files made at test time with
//! GnuTLS's `certtool` and `psktool` (Debian's gnutls-bin), and a raw TLS client in Python for
//! the protocol corner cases no real client sends (STARTTLS twice, bytes after the ACK).
//!
//! The PKI is made once per test binary. CAs have ECDSA keys (fast to make); the leaf
//! certificates have 2048-bit RSA keys with the key usages qemu insists on (it refuses a
//! certificate whose usage does not permit key encipherment, which GnuTLS never sets for
//! ECDSA keys):
//!
//! - CA `ca` signs the server certificate (`localhost`, `127.0.0.1`), the client `client1`
//!   and the client `revoked`, which its CRL revokes;
//! - CA `other` signs the client `stranger`.
//!
//! Directories are laid out as the peers expect them: servers (nbdkit `--tls-certificates`,
//! qemu `tls-creds-x509,endpoint=server`) get `ca-cert.pem`, `server-cert.pem`,
//! `server-key.pem` (and `ca-crl.pem`); clients (libnbd `tls-certificates=`, qemu
//! `endpoint=client`) get `ca-cert.pem`, `client-cert.pem`, `client-key.pem`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use super::{path_str, run, PYTHON};

/// The test PKI and PSK files (see the module doc).
pub struct Pki {
    pub root: PathBuf,
}

/// The PSK username of the good key.
pub const PSK_USER: &str = "alice";

impl Pki {
    /// The PKI of this test binary, made on first use.
    pub fn get() -> &'static Pki {
        static PKI: OnceLock<Pki> = OnceLock::new();
        PKI.get_or_init(|| {
            let root = Path::new(env!("CARGO_TARGET_TMPDIR"))
                .join(format!("tls-pki-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            std::fs::create_dir_all(&root).unwrap();
            make_pki(&root);
            Pki { root }
        })
    }

    /// Server X.509 directory without a CRL.
    pub fn server(&self) -> PathBuf {
        self.root.join("server")
    }

    /// Server X.509 directory with `ca-crl.pem` revoking the client `revoked`.
    pub fn server_with_crl(&self) -> PathBuf {
        self.root.join("server-crl")
    }

    /// Client directory: `client1` (good), `revoked`, `stranger` (other CA) or `nocert`
    /// (only the CA certificate).
    pub fn client(&self, name: &str) -> PathBuf {
        self.root.join(format!("client-{name}"))
    }

    /// psktool file with the good key of [`PSK_USER`].
    pub fn psk(&self) -> PathBuf {
        self.root.join("psk/keys.psk")
    }

    /// A directory holding the good key as `keys.psk` (qemu's `tls-creds-psk` layout).
    pub fn psk_dir(&self) -> PathBuf {
        self.root.join("psk")
    }

    /// [`PSK_USER`] with a different key.
    pub fn wrong_psk(&self) -> PathBuf {
        self.root.join("wrong.psk")
    }

    /// A key for `mallory`, whom the server does not know.
    pub fn unknown_psk(&self) -> PathBuf {
        self.root.join("mallory.psk")
    }
}

fn certtool(args: &[&str]) {
    let out = Command::new("certtool")
        .args(args)
        .output()
        .expect("run certtool (install gnutls-bin: scripts/test.sh)");
    assert!(
        out.status.success(),
        "certtool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn key(path: &Path, kind: &str) {
    certtool(&["--generate-privkey", kind, "--outfile", path_str(path)]);
}

fn template(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(format!("{name}.info"));
    std::fs::write(&p, text).unwrap();
    p
}

/// A CA: `NAME-key.pem`, `NAME-cert.pem` in `work`.
fn make_ca(work: &Path, name: &str) {
    key(&work.join(format!("{name}-key.pem")), "--key-type=ecdsa");
    let t = template(
        work,
        name,
        &format!(
            "cn = Test CA {name}\nca\ncert_signing_key\ncrl_signing_key\nexpiration_days = 30\n"
        ),
    );
    certtool(&[
        "--generate-self-signed",
        "--load-privkey",
        path_str(&work.join(format!("{name}-key.pem"))),
        "--template",
        path_str(&t),
        "--outfile",
        path_str(&work.join(format!("{name}-cert.pem"))),
    ]);
}

/// A certificate `NAME-cert.pem` (key `NAME-key.pem`) signed by CA `ca`.
fn make_cert(work: &Path, ca: &str, name: &str, body: &str) {
    key(&work.join(format!("{name}-key.pem")), "--bits=2048");
    let t = template(work, name, &format!("{body}expiration_days = 30\n"));
    certtool(&[
        "--generate-certificate",
        "--load-ca-certificate",
        path_str(&work.join(format!("{ca}-cert.pem"))),
        "--load-ca-privkey",
        path_str(&work.join(format!("{ca}-key.pem"))),
        "--load-privkey",
        path_str(&work.join(format!("{name}-key.pem"))),
        "--template",
        path_str(&t),
        "--outfile",
        path_str(&work.join(format!("{name}-cert.pem"))),
    ]);
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to).unwrap_or_else(|e| panic!("copy {from:?} to {to:?}: {e}"));
}

fn make_pki(root: &Path) {
    let work = root.join("work");
    std::fs::create_dir_all(&work).unwrap();
    make_ca(&work, "ca");
    make_ca(&work, "other");
    make_cert(
        &work,
        "ca",
        "server",
        "organization = Test\ncn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\n\
         tls_www_server\nencryption_key\nsigning_key\n",
    );
    let client = "tls_www_client\nencryption_key\nsigning_key\n";
    make_cert(
        &work,
        "ca",
        "client1",
        &format!("country = GB\norganization = Test\ncn = client1\n{client}"),
    );
    make_cert(
        &work,
        "ca",
        "revoked",
        &format!("organization = Test\ncn = revoked\n{client}"),
    );
    make_cert(
        &work,
        "other",
        "stranger",
        &format!("organization = Elsewhere\ncn = stranger\n{client}"),
    );
    let crl = template(&work, "crl", "crl_next_update = 30\ncrl_number = 1\n");
    certtool(&[
        "--generate-crl",
        "--load-ca-privkey",
        path_str(&work.join("ca-key.pem")),
        "--load-ca-certificate",
        path_str(&work.join("ca-cert.pem")),
        "--load-certificate",
        path_str(&work.join("revoked-cert.pem")),
        "--template",
        path_str(&crl),
        "--outfile",
        path_str(&work.join("ca-crl.pem")),
    ]);

    for (dir, crl) in [("server", false), ("server-crl", true)] {
        let d = root.join(dir);
        std::fs::create_dir_all(&d).unwrap();
        copy(&work.join("ca-cert.pem"), &d.join("ca-cert.pem"));
        copy(&work.join("server-cert.pem"), &d.join("server-cert.pem"));
        copy(&work.join("server-key.pem"), &d.join("server-key.pem"));
        if crl {
            copy(&work.join("ca-crl.pem"), &d.join("ca-crl.pem"));
        }
    }
    for name in ["client1", "revoked", "stranger", "nocert"] {
        let d = root.join(format!("client-{name}"));
        std::fs::create_dir_all(&d).unwrap();
        // Every client trusts the right CA for the server; only its own certificate differs.
        copy(&work.join("ca-cert.pem"), &d.join("ca-cert.pem"));
        if name != "nocert" {
            copy(
                &work.join(format!("{name}-cert.pem")),
                &d.join("client-cert.pem"),
            );
            copy(
                &work.join(format!("{name}-key.pem")),
                &d.join("client-key.pem"),
            );
        }
    }

    std::fs::create_dir_all(root.join("psk")).unwrap();
    psktool(PSK_USER, &root.join("psk/keys.psk"));
    psktool(PSK_USER, &root.join("wrong.psk"));
    psktool("mallory", &root.join("mallory.psk"));
}

fn psktool(user: &str, file: &Path) {
    run("psktool", &["-u", user, "-p", path_str(file)]);
}

/// Python helpers for a raw NBD client that can switch to TLS (Python's `ssl`, i.e. OpenSSL
/// on the client side): `connect(path)` reads the greeting and sends fixed-newstyle flags;
/// `opt(s, code, data)` sends an option and returns `[(reply kind, data)]` up to the final
/// reply; `tls(s, client_dir)` wraps the socket after an acknowledged STARTTLS; `info(name)` is
/// an INFO/GO payload; `closed(s)` is true if the server closes without sending more.
pub const PY_PRELUDE: &str = r#"
import socket, ssl, struct, sys, json, time
IHAVEOPT = 0x49484156454f5054
REPLY_MAGIC = 0x0003e889045565a9
def recvn(s, n):
    b = b''
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError('closed after %d of %d bytes' % (len(b), n))
        b += c
    return b
def connect(path, flags=3):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(20)
    s.connect(path)
    g = recvn(s, 18)
    assert g[:16] == b'NBDMAGICIHAVEOPT', g
    s.sendall(struct.pack('>I', flags))
    return s
def send_opt(s, code, data=b''):
    s.sendall(struct.pack('>QII', IHAVEOPT, code, len(data)) + data)
def opt(s, code, data=b''):
    send_opt(s, code, data)
    replies = []
    while True:
        magic, o, kind, ln = struct.unpack('>QIII', recvn(s, 20))
        assert magic == REPLY_MAGIC, hex(magic)
        replies.append((kind, recvn(s, ln)))
        if kind == 1 or kind & 0x80000000:
            return replies
def tls(s, client_dir):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(client_dir + '/ca-cert.pem')
    ctx.load_cert_chain(client_dir + '/client-cert.pem', client_dir + '/client-key.pem')
    return ctx.wrap_socket(s, server_hostname='localhost')
def info(name=b''):
    return struct.pack('>I', len(name)) + name + struct.pack('>H', 0)
def closed(s):
    try:
        return s.recv(1) == b''
    except (ConnectionResetError, ssl.SSLError):
        return True
"#;

/// Runs `body` after [`PY_PRELUDE`] with `sock` and `client` (a client PKI directory) set,
/// and returns its stdout; panics if the script fails.
pub fn py_tls(sock: &Path, client: &Path, body: &str) -> String {
    let script = format!(
        "{PY_PRELUDE}\nsock = {:?}\nclient = {:?}\n{body}\n",
        path_str(sock),
        path_str(client)
    );
    run(PYTHON, &["-c", &script])
}
