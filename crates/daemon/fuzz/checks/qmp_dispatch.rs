//! Fuzzes QMP command dispatch up to the handlers: bytes go through the monitor's JSON stream
//! reader and request check, then the generated argument parsers of the named command
//! ([`parse_arguments`], what `dispatch` runs before any side effect), under a default or a
//! rejecting `-compat` policy. With the first byte odd the rest is instead a command-line
//! option in keyval syntax read as one of the types `sluice daemon`'s options take.
//!
//! Properties: no panic; every command the request check lets through is in `COMMANDS`
//! exactly when `parse_arguments` knows it; every argument error is a GenericError with a
//! non-empty description of one line, as QEMU's visitors give, unless the input itself holds
//! a line break (the description quotes the value, as QEMU's does: the first finding).

use serde_json::Value;
use sluice_daemon::generated::{
    parse_arguments, BlockExportOptions, BlockdevOptions, NbdServerOptions, ObjectOptions, COMMANDS,
};
use sluice_daemon::{ErrorClass, QmpError};
use sluice_proto::qmp::{parse_request, JsonStream, Limits};
use sluice_qapi::runtime::{CompatPolicy, Input, InputPolicy};

/// Runs the target's checks on one input (a fuzz input or a committed seed).
pub fn run(data: &[u8]) {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let policy = if pick & 2 == 0 {
        CompatPolicy::default()
    } else {
        CompatPolicy {
            deprecated_input: InputPolicy::Reject,
            unstable_input: InputPolicy::Reject,
            ..CompatPolicy::default()
        }
    };
    if pick & 1 == 1 {
        keyval_option(pick >> 2, rest, &policy);
    } else {
        json_lines(rest, &policy);
    }
}

fn json_lines(data: &[u8], policy: &CompatPolicy) {
    let mut stream = JsonStream::new(Limits::default());
    let mut parsed = Vec::new();
    stream.feed(data, &mut parsed);
    stream.finish(&mut parsed);
    for v in parsed.into_iter().flatten() {
        let Ok(req) = parse_request(v, true) else {
            continue;
        };
        let known = COMMANDS.iter().any(|c| c.name == req.command);
        let mut inp = Input::json(policy);
        let r = parse_arguments(&req.command, &req.arguments, &mut inp);
        assert_eq!(r.is_some(), known, "{}", req.command);
        if let Some(Err(e)) = r {
            check_error(
                &e,
                Value::Object(req.arguments.clone())
                    .to_string()
                    .contains("\\n"),
            );
        }
    }
}

fn keyval_option(which: u8, data: &[u8], policy: &CompatPolicy) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let implied = match which % 4 {
        0 => None,
        1 => Some("type"),
        2 => None,
        _ => Some("qom-type"),
    };
    let Ok(Value::Object(obj)) = sluice_qapi::keyval::parse(text, implied) else {
        return;
    };
    let mut inp = Input::keyval(policy);
    let r: Result<(), QmpError> = match which % 4 {
        0 => BlockdevOptions::from_args(&mut inp, &obj).map(drop),
        1 => BlockExportOptions::from_args(&mut inp, &obj).map(drop),
        2 => NbdServerOptions::from_args(&mut inp, &obj).map(drop),
        _ => ObjectOptions::from_args(&mut inp, &obj).map(drop),
    };
    if let Err(e) = r {
        check_error(&e, text.contains('\n'));
    }
}

fn check_error(e: &QmpError, input_has_newline: bool) {
    assert_eq!(e.class, ErrorClass::GenericError, "{}", e.desc);
    assert!(!e.desc.is_empty(), "empty error description");
    assert!(input_has_newline || !e.desc.contains('\n'), "{:?}", e.desc);
}
