//! One QMP client connection: connect, read the greeting, negotiate, run commands, read
//! events.
//!
//! Blocking std sockets, one thread: a command-line client does one thing at a time, and the
//! only concurrency it needs (following events while polling a job) is a read with a deadline,
//! which `set_read_timeout` gives. Both QEMU's monitor and sluice's write one message per line
//! (QMP's documented framing), so messages are framed by line and each keeps its raw text for
//! `--json`; serde_json parses the line. Events that arrive while a command waits for its
//! reply are queued in [`Connection::events`] in arrival order, so nothing the server says is
//! lost or reordered for the caller.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use sluice_block::Errno;

/// How long the server may take to greet. QEMU's monitor serves one client at a time, so a
/// connection that is accepted but never greeted usually means another client holds it.
const GREETING_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the monitor listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Unix(PathBuf),
    Tcp { host: String, port: u16 },
}

impl Address {
    /// A word with a `/` is a path; otherwise `HOST:PORT` (a numeric port; IPv6 hosts in
    /// brackets) is TCP; anything else is a path in the current directory.
    pub fn parse(s: &str) -> Address {
        if !s.contains('/') {
            if let Some((host, port)) = s.rsplit_once(':') {
                let host = host
                    .strip_prefix('[')
                    .and_then(|h| h.strip_suffix(']'))
                    .unwrap_or(host);
                if let (false, Ok(port)) = (host.is_empty(), port.parse::<u16>()) {
                    return Address::Tcp {
                        host: host.to_string(),
                        port,
                    };
                }
            }
        }
        Address::Unix(PathBuf::from(s))
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Unix(p) => write!(f, "{}", p.display()),
            Address::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Address::Tcp { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// What went wrong on the connection. [`ConnError::is_usage`] says which ones are the user's
/// input (exit status 2) rather than a failure at run time (1).
#[derive(Debug)]
pub enum ConnError {
    /// Nothing to connect to (missing socket, refused, unknown host).
    Connect { addr: String, errno_text: String },
    /// The peer is not a QMP monitor.
    NotQmp { addr: String, why: String },
    /// The peer accepted the connection but did not greet in time.
    NoGreeting { addr: String },
    /// The server closed the connection.
    Closed,
    /// A read or write failed.
    Io(String),
    /// A line from the server is not JSON.
    BadJson { line: String, why: String },
}

impl ConnError {
    pub fn is_usage(&self) -> bool {
        matches!(self, ConnError::Connect { .. } | ConnError::NotQmp { .. })
    }
}

impl std::fmt::Display for ConnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnError::Connect { addr, errno_text } => {
                write!(f, "cannot connect to QMP monitor {addr}: {errno_text}")
            }
            ConnError::NotQmp { addr, why } => write!(f, "{addr} is not a QMP monitor: {why}"),
            ConnError::NoGreeting { addr } => write!(
                f,
                "no QMP greeting from {addr} within {} s (QEMU's monitors serve one client at \
                 a time: is another one connected?)",
                GREETING_TIMEOUT.as_secs()
            ),
            ConnError::Closed => write!(f, "the QMP server closed the connection"),
            ConnError::Io(e) => write!(f, "QMP connection failed: {e}"),
            ConnError::BadJson { line, why } => {
                write!(
                    f,
                    "the QMP server sent a line that is not JSON ({why}): {line}"
                )
            }
        }
    }
}

/// strerror's text ("No such file or directory"), without Rust's "(os error N)".
fn errno_text(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => Errno(n).describe(),
        None => e.to_string(),
    }
}

/// One message from the server: its line as sent and the parsed value.
#[derive(Debug, Clone)]
pub struct Message {
    pub raw: String,
    pub value: Value,
}

impl Message {
    /// The event's name, if this is an event.
    pub fn event(&self) -> Option<&str> {
        self.value.get("event").and_then(Value::as_str)
    }

    /// The event's `data` (`null` when absent).
    pub fn data(&self) -> &Value {
        self.value.get("data").unwrap_or(&Value::Null)
    }
}

/// A command's outcome.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Return(Value),
    Error { class: String, desc: String },
}

impl Reply {
    pub fn of(m: &Message) -> Reply {
        if let Some(v) = m.value.get("return") {
            return Reply::Return(v.clone());
        }
        let e = m.value.get("error").unwrap_or(&Value::Null);
        let text = |k: &str| e.get(k).and_then(Value::as_str).map(str::to_string);
        Reply::Error {
            class: text("class").unwrap_or_else(|| "GenericError".into()),
            desc: text("desc").unwrap_or_else(|| format!("unexpected reply {}", m.raw)),
        }
    }
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.write_all(buf),
            Stream::Tcp(s) => s.write_all(buf),
        }
    }
}

/// A negotiated QMP connection.
pub struct Connection {
    stream: Stream,
    buf: Vec<u8>,
    /// Events read while waiting for a reply, oldest first.
    pub events: VecDeque<Message>,
    /// The server's `{"QMP": ...}` greeting.
    pub greeting: Value,
}

impl Connection {
    /// Connects, reads the greeting and sends `qmp_capabilities` (no optional capability is
    /// enabled).
    pub fn open(addr: &Address) -> Result<Connection, ConnError> {
        let connect_err = |e: std::io::Error| ConnError::Connect {
            addr: addr.to_string(),
            errno_text: errno_text(&e),
        };
        let stream = match addr {
            Address::Unix(p) => Stream::Unix(UnixStream::connect(p).map_err(connect_err)?),
            Address::Tcp { host, port } => {
                let s = TcpStream::connect((host.as_str(), *port)).map_err(connect_err)?;
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }
        };
        let mut c = Connection {
            stream,
            buf: Vec::new(),
            events: VecDeque::new(),
            greeting: Value::Null,
        };
        let not_qmp = |why: String| ConnError::NotQmp {
            addr: addr.to_string(),
            why,
        };
        let greeting = match c.next_line(Some(Instant::now() + GREETING_TIMEOUT), true) {
            Ok(Some(m)) => m,
            Ok(None) => {
                return Err(ConnError::NoGreeting {
                    addr: addr.to_string(),
                })
            }
            Err(ConnError::Closed) => {
                return Err(not_qmp(
                    "it closed the connection without a greeting".into(),
                ))
            }
            Err(ConnError::BadJson { line, .. }) => {
                return Err(not_qmp(format!("its first line is not JSON: {line}")))
            }
            Err(e) => return Err(e),
        };
        if greeting.value.get("QMP").is_none() {
            return Err(not_qmp(format!("its greeting is {}", greeting.raw)));
        }
        c.greeting = greeting.value;
        match c.execute("qmp_capabilities", &Map::new())? {
            Reply::Return(_) => Ok(c),
            Reply::Error { class, desc } => {
                Err(not_qmp(format!("qmp_capabilities failed: {class}: {desc}")))
            }
        }
    }

    /// Sends a command and reads up to its reply; events read meanwhile are queued. Returns
    /// the reply message with its outcome.
    pub fn execute_message(
        &mut self,
        command: &str,
        arguments: &Map<String, Value>,
    ) -> Result<(Message, Reply), ConnError> {
        let cmd = if arguments.is_empty() {
            json!({ "execute": command })
        } else {
            json!({ "execute": command, "arguments": arguments })
        };
        let mut line = serde_json::to_vec(&cmd).expect("a JSON value serializes");
        line.push(b'\n');
        self.stream
            .write_all(&line)
            .map_err(|e| ConnError::Io(format!("sending {command}: {}", errno_text(&e))))?;
        loop {
            let m = self
                .next_line(None, false)?
                .expect("no deadline, no timeout");
            if m.event().is_some() {
                self.events.push_back(m);
            } else {
                let reply = Reply::of(&m);
                return Ok((m, reply));
            }
        }
    }

    /// [`Connection::execute_message`] for callers that only need the outcome.
    pub fn execute(
        &mut self,
        command: &str,
        arguments: &Map<String, Value>,
    ) -> Result<Reply, ConnError> {
        Ok(self.execute_message(command, arguments)?.1)
    }

    /// The next message: a queued event first, else one read from the socket. `None` when
    /// `deadline` passes first.
    pub fn next(&mut self, deadline: Option<Instant>) -> Result<Option<Message>, ConnError> {
        if let Some(m) = self.events.pop_front() {
            return Ok(Some(m));
        }
        self.next_line(deadline, false)
    }

    /// Reads one line-framed message. `greeting`: fail at once if the first byte cannot
    /// start a JSON object (an NBD server greets with `NBDMAGIC`, without a newline).
    fn next_line(
        &mut self,
        deadline: Option<Instant>,
        greeting: bool,
    ) -> Result<Option<Message>, ConnError> {
        loop {
            while let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let bytes: Vec<u8> = self.buf.drain(..=i).collect();
                let raw = String::from_utf8_lossy(&bytes).trim_end().to_string();
                if raw.is_empty() {
                    continue;
                }
                return match serde_json::from_str(&raw) {
                    Ok(value) => Ok(Some(Message { raw, value })),
                    Err(e) => Err(ConnError::BadJson {
                        line: raw,
                        why: e.to_string(),
                    }),
                };
            }
            if greeting {
                if let Some(&b) = self.buf.iter().find(|b| !b.is_ascii_whitespace()) {
                    if b != b'{' {
                        let shown = String::from_utf8_lossy(&self.buf[..self.buf.len().min(16)])
                            .escape_debug()
                            .to_string();
                        return Err(ConnError::BadJson {
                            line: format!("\"{shown}\"..."),
                            why: "not a JSON object".into(),
                        });
                    }
                }
            }
            let timeout = match deadline {
                None => None,
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(t) if !t.is_zero() => Some(t),
                    _ => return Ok(None),
                },
            };
            self.stream
                .set_read_timeout(timeout)
                .map_err(|e| ConnError::Io(errno_text(&e)))?;
            let mut chunk = [0u8; 16384];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(ConnError::Closed),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return Err(ConnError::Closed)
                }
                Err(e) => return Err(ConnError::Io(errno_text(&e))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_parse_paths_and_tcp() {
        assert_eq!(
            Address::parse("/run/qmp.sock"),
            Address::Unix("/run/qmp.sock".into())
        );
        assert_eq!(Address::parse("qmp.sock"), Address::Unix("qmp.sock".into()));
        assert_eq!(Address::parse("./host:1"), Address::Unix("./host:1".into()));
        assert_eq!(
            Address::parse("localhost:4444"),
            Address::Tcp {
                host: "localhost".into(),
                port: 4444
            }
        );
        assert_eq!(
            Address::parse("[::1]:4444"),
            Address::Tcp {
                host: "::1".into(),
                port: 4444
            }
        );
        assert_eq!(Address::parse(":4444"), Address::Unix(":4444".into()));
        assert_eq!(Address::parse("a:b"), Address::Unix("a:b".into()));
        assert_eq!(Address::parse("[::1]:4444").to_string(), "[::1]:4444");
    }

    #[test]
    fn reply_of_return_and_error() {
        let m = |raw: &str| Message {
            raw: raw.into(),
            value: serde_json::from_str(raw).unwrap(),
        };
        assert_eq!(
            Reply::of(&m(r#"{"return": {"a": 1}}"#)),
            Reply::Return(json!({"a": 1}))
        );
        assert_eq!(
            Reply::of(&m(
                r#"{"error": {"class": "CommandNotFound", "desc": "The command x has not been found"}}"#
            )),
            Reply::Error {
                class: "CommandNotFound".into(),
                desc: "The command x has not been found".into()
            }
        );
    }

    #[test]
    fn errno_text_has_no_os_error_suffix() {
        let e = std::io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(errno_text(&e), "Connection refused");
    }
}
