//! Fuzzes QEMU's keyval syntax (`--blockdev driver=file,filename=x,cache.direct=on`).
//!
//! The first byte picks whether the option has an implied key (`--export nbd,...`).
//! Properties: no panic; what parses is a JSON object (QEMU: the root is never a list; this
//! target found `0.b=1` accepted as a list); every leaf is a string, a list or an object;
//! and every list is non-empty (indexes run from 0 with no gap).

use serde_json::Value;
use sluice_qapi::keyval::parse;

/// Runs the target's checks on one input (a fuzz input or a committed seed).
pub fn run(data: &[u8]) {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let Ok(s) = std::str::from_utf8(rest) else {
        return;
    };
    let implied = (pick & 1 == 1).then_some("type");
    if let Ok(v) = parse(s, implied) {
        assert!(v.is_object(), "{s:?} parsed to {v}");
        check(&v);
    }
}

fn check(v: &Value) {
    match v {
        Value::String(_) => {}
        Value::Object(m) => m.values().for_each(check),
        Value::Array(a) => {
            assert!(!a.is_empty());
            a.iter().for_each(check);
        }
        other => panic!("keyval made a non-string leaf {other}"),
    }
}
