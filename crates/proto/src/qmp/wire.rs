//! QMP messages: checking a command, encoding replies, events and the greeting.
//!
//! [`parse_request`] applies QEMU's checks to a parsed value in QEMU's words (`QMP input must
//! be a JSON object`, `QMP input member 'foo' is unexpected`, ...) and returns the command
//! name, its arguments and the `id` to echo; the `id` is returned with the error too, since
//! QEMU echoes it whenever the input was an object.
//!
//! The encoders write what QEMU writes: one line per message, `", "` and `": "` separators,
//! ASCII only (everything else as `\uXXXX` with upper-case hex, surrogate pairs beyond the
//! BMP), and CRLF at the end. They append to the caller's buffer so that a monitor can batch
//! an event and a reply into one write.

use serde_json::{Map, Value};

/// QMP error classes (QAPI's `QapiErrorClass`). Clients match on these, so they are ABI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorClass {
    /// Everything without a more specific class (almost every error since QEMU 1.2).
    GenericError,
    /// Unknown command, command before negotiation, command rejected by policy.
    CommandNotFound,
    /// Legacy block-job commands naming a job that does not exist.
    DeviceNotActive,
    /// A few legacy commands naming a device that does not exist.
    DeviceNotFound,
    /// Not used by sluice; listed because it is part of the enum.
    KvmMissingCap,
}

impl ErrorClass {
    /// The class as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KvmMissingCap => "KVMMissingCap",
        }
    }
}

/// A QMP error reply: `{"error": {"class": ..., "desc": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{desc}")]
pub struct QmpError {
    pub class: ErrorClass,
    /// One line for humans; clients must not parse it.
    pub desc: String,
}

impl QmpError {
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> QmpError {
        QmpError {
            class,
            desc: desc.into(),
        }
    }

    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> QmpError {
        QmpError::new(ErrorClass::GenericError, desc)
    }

    /// A `CommandNotFound`.
    pub fn command_not_found(desc: impl Into<String>) -> QmpError {
        QmpError::new(ErrorClass::CommandNotFound, desc)
    }
}

/// A well-formed command.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The value of `execute` or `exec-oob`.
    pub command: String,
    /// It came as `exec-oob`.
    pub oob: bool,
    /// `arguments`, or an empty object when absent.
    pub arguments: Map<String, Value>,
    /// `id`, echoed verbatim in the reply.
    pub id: Option<Value>,
}

/// Input that is not a well-formed command, with the `id` to echo if there was one.
#[derive(Debug, Clone, PartialEq)]
pub struct BadRequest {
    pub error: QmpError,
    pub id: Option<Value>,
}

/// Checks the top level of a command (QEMU's `qmp_dispatch_check_obj`). `exec-oob` is only
/// a member when out-of-band execution was negotiated; otherwise it is unexpected.
pub fn parse_request(v: Value, oob_enabled: bool) -> Result<Request, BadRequest> {
    let Value::Object(mut obj) = v else {
        return Err(BadRequest {
            error: QmpError::generic("QMP input must be a JSON object"),
            id: None,
        });
    };
    let id = obj.shift_remove("id");
    let fail = |desc: String, id: Option<Value>| {
        Err(BadRequest {
            error: QmpError::generic(desc),
            id,
        })
    };
    let mut exec_key: Option<&str> = None;
    for (key, value) in &obj {
        match key.as_str() {
            "execute" | "exec-oob" if key == "execute" || oob_enabled => {
                if !value.is_string() {
                    return fail(format!("QMP input member '{key}' must be a string"), id);
                }
                if exec_key.is_some() {
                    // Reported the same way whichever came first, as QEMU 10 words it.
                    return fail(
                        "QMP input member 'execute' clashes with 'exec-oob'".to_string(),
                        id,
                    );
                }
                exec_key = Some(if key == "execute" {
                    "execute"
                } else {
                    "exec-oob"
                });
            }
            "arguments" => {
                if !value.is_object() {
                    return fail(
                        "QMP input member 'arguments' must be an object".to_string(),
                        id,
                    );
                }
            }
            _ => return fail(format!("QMP input member '{key}' is unexpected"), id),
        }
    }
    let Some(exec_key) = exec_key else {
        return fail("QMP input lacks member 'execute'".to_string(), id);
    };
    let command = match obj.shift_remove(exec_key) {
        Some(Value::String(s)) => s,
        _ => unreachable!("checked to be a string above"),
    };
    let arguments = match obj.shift_remove("arguments") {
        Some(Value::Object(m)) => m,
        _ => Map::new(),
    };
    Ok(Request {
        command,
        oob: exec_key == "exec-oob",
        arguments,
        id,
    })
}

/// Wall-clock time of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamp {
    pub seconds: i64,
    pub microseconds: i64,
}

impl Timestamp {
    /// QEMU's value when the clock cannot be read.
    pub const UNKNOWN: Timestamp = Timestamp {
        seconds: -1,
        microseconds: -1,
    };
}

/// `{"return": VALUE, "id": ID}` and CRLF.
pub fn encode_return(value: &Value, id: Option<&Value>, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"return\": ");
    write_value(value, out);
    finish_reply(id, out);
}

/// `{"error": {"class": ..., "desc": ...}, "id": ID}` and CRLF.
pub fn encode_error(err: &QmpError, id: Option<&Value>, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"error\": {\"class\": ");
    write_str(err.class.as_str(), out);
    out.extend_from_slice(b", \"desc\": ");
    write_str(&err.desc, out);
    out.push(b'}');
    finish_reply(id, out);
}

fn finish_reply(id: Option<&Value>, out: &mut Vec<u8>) {
    if let Some(id) = id {
        out.extend_from_slice(b", \"id\": ");
        write_value(id, out);
    }
    out.extend_from_slice(b"}\r\n");
}

/// `{"event": NAME, "data": DATA, "timestamp": {...}}` and CRLF (`data` left out when None).
pub fn encode_event(name: &str, data: Option<&Value>, ts: Timestamp, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"event\": ");
    write_str(name, out);
    if let Some(data) = data {
        out.extend_from_slice(b", \"data\": ");
        write_value(data, out);
    }
    out.extend_from_slice(
        format!(
            ", \"timestamp\": {{\"seconds\": {}, \"microseconds\": {}}}}}\r\n",
            ts.seconds, ts.microseconds
        )
        .as_bytes(),
    );
}

/// `{"QMP": {"version": VERSION, "capabilities": [...]}}` and CRLF.
pub fn encode_greeting(version: &Value, capabilities: &[&str], out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"QMP\": {\"version\": ");
    write_value(version, out);
    out.extend_from_slice(b", \"capabilities\": [");
    for (i, c) in capabilities.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(b", ");
        }
        write_str(c, out);
    }
    out.extend_from_slice(b"]}}\r\n");
}

/// Writes `v` as QEMU does: compact on one line with `", "` and `": "`, ASCII only.
pub fn write_value(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => out.extend_from_slice(n.to_string().as_bytes()),
        Value::String(s) => write_str(s, out),
        Value::Array(a) => {
            out.push(b'[');
            for (i, e) in a.iter().enumerate() {
                if i > 0 {
                    out.extend_from_slice(b", ");
                }
                write_value(e, out);
            }
            out.push(b']');
        }
        Value::Object(m) => {
            out.push(b'{');
            for (i, (k, e)) in m.iter().enumerate() {
                if i > 0 {
                    out.extend_from_slice(b", ");
                }
                write_str(k, out);
                out.extend_from_slice(b": ");
                write_value(e, out);
            }
            out.push(b'}');
        }
    }
}

fn write_str(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\u{8}' => out.extend_from_slice(b"\\b"),
            '\u{c}' => out.extend_from_slice(b"\\f"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            ' '..='~' => out.push(c as u8),
            _ => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.extend_from_slice(format!("\\u{:04X}", u).as_bytes());
                }
            }
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn bad(v: Value, oob: bool) -> (String, Option<Value>) {
        let e = parse_request(v, oob).unwrap_err();
        assert_eq!(e.error.class, ErrorClass::GenericError);
        (e.error.desc, e.id)
    }

    #[test]
    fn parse_request_full_command_keeps_arguments_and_id() {
        let r = parse_request(
            json!({"execute": "blockdev-del", "arguments": {"node-name": "a"}, "id": {"any": [1, null]}}),
            false,
        )
        .unwrap();
        assert_eq!(r.command, "blockdev-del");
        assert!(!r.oob);
        assert_eq!(Value::Object(r.arguments), json!({"node-name": "a"}));
        assert_eq!(r.id, Some(json!({"any": [1, null]})));
    }

    #[test]
    fn parse_request_without_arguments_gives_empty_object() {
        let r = parse_request(json!({"execute": "quit"}), false).unwrap();
        assert!(r.arguments.is_empty());
        assert_eq!(r.id, None);
    }

    #[test]
    fn parse_request_malformed_inputs_get_qemu_messages() {
        assert_eq!(
            bad(json!([1, 2, 3]), false),
            ("QMP input must be a JSON object".into(), None)
        );
        assert_eq!(
            bad(json!({"id": "noexec"}), false),
            (
                "QMP input lacks member 'execute'".into(),
                Some(json!("noexec"))
            )
        );
        assert_eq!(
            bad(json!({"execute": 1, "id": 2}), false).0,
            "QMP input member 'execute' must be a string"
        );
        assert_eq!(
            bad(json!({"execute": "x", "arguments": []}), false).0,
            "QMP input member 'arguments' must be an object"
        );
        assert_eq!(
            bad(json!({"execute": "x", "foo": 1}), false).0,
            "QMP input member 'foo' is unexpected"
        );
    }

    #[test]
    fn parse_request_exec_oob_is_unexpected_until_negotiated() {
        assert_eq!(
            bad(json!({"exec-oob": "x"}), false).0,
            "QMP input member 'exec-oob' is unexpected"
        );
        let r = parse_request(json!({"exec-oob": "x"}), true).unwrap();
        assert!(r.oob);
        assert_eq!(r.command, "x");
    }

    #[test]
    fn parse_request_execute_and_exec_oob_clash_in_either_order() {
        for v in [
            json!({"execute": "a", "exec-oob": "b"}),
            json!({"exec-oob": "b", "execute": "a"}),
        ] {
            assert_eq!(
                bad(v, true).0,
                "QMP input member 'execute' clashes with 'exec-oob'"
            );
        }
    }

    #[test]
    fn encode_return_with_id_is_one_crlf_line() {
        let mut out = Vec::new();
        encode_return(&json!({"a": [1, true]}), Some(&json!("x")), &mut out);
        assert_eq!(out, b"{\"return\": {\"a\": [1, true]}, \"id\": \"x\"}\r\n");
    }

    #[test]
    fn encode_error_without_id() {
        let mut out = Vec::new();
        encode_error(
            &QmpError::command_not_found("The command x has not been found"),
            None,
            &mut out,
        );
        assert_eq!(
            out,
            b"{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command x has not been found\"}}\r\n"
        );
    }

    #[test]
    fn encode_event_has_timestamp() {
        let mut out = Vec::new();
        let ts = Timestamp {
            seconds: 5,
            microseconds: 7,
        };
        encode_event("SHUTDOWN", Some(&json!({"guest": false})), ts, &mut out);
        assert_eq!(
            out,
            b"{\"event\": \"SHUTDOWN\", \"data\": {\"guest\": false}, \"timestamp\": {\"seconds\": 5, \"microseconds\": 7}}\r\n"
        );
        out.clear();
        encode_event("X", None, Timestamp::UNKNOWN, &mut out);
        assert_eq!(
            out,
            b"{\"event\": \"X\", \"timestamp\": {\"seconds\": -1, \"microseconds\": -1}}\r\n"
        );
    }

    #[test]
    fn encode_greeting_lists_capabilities() {
        let mut out = Vec::new();
        encode_greeting(&json!({"package": "p"}), &["oob"], &mut out);
        assert_eq!(
            out,
            b"{\"QMP\": {\"version\": {\"package\": \"p\"}, \"capabilities\": [\"oob\"]}}\r\n"
        );
    }

    #[test]
    fn write_value_escapes_to_ascii_like_qemu() {
        let mut out = Vec::new();
        write_value(&json!("é☃\u{1F600}\"\\\n\u{1}/\u{7f}"), &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#""\u00E9\u2603\uD83D\uDE00\"\\\n\u0001/\u007F""#
        );
    }

    #[test]
    fn write_value_round_trips_through_the_stream_parser() {
        let v = json!({"s": "é\u{0}x", "n": [-1, 18446744073709551615u64, 0.5], "o": {}});
        let mut out = Vec::new();
        write_value(&v, &mut out);
        let mut s = crate::qmp::JsonStream::default();
        let mut parsed = Vec::new();
        s.feed(&out, &mut parsed);
        assert_eq!(parsed, vec![Ok(v)]);
    }
}
