//! QEMU's keyval syntax for command-line options: `driver=file,node-name=f,cache.direct=on`.
//!
//! [`parse`] turns an option string into the JSON object the generated parsers read in
//! keyval mode: dotted keys make nested objects, objects whose keys are all `0`, `1`, ... make
//! lists, and every value is a string (the parser converts `on`, `1G`, `0x10`). As in QEMU, a
//! comma inside a value is written `,,`, the first parameter may omit its key when the option
//! has an implied one (`--export nbd,...` means `type=nbd`), and a repeated key keeps its last
//! value. An option that starts with `{` is JSON instead (`--blockdev '{"driver": ...}'`).

use serde_json::{Map, Value};

/// Parses `s`; `implied` is the key of a first parameter written without `key=`.
pub fn parse(s: &str, implied: Option<&str>) -> Result<Value, String> {
    let mut root = Map::new();
    let mut rest = s;
    let mut first = true;
    while !rest.is_empty() {
        // The key runs to '=' or ',' (whichever comes first).
        let key_end = rest.find(['=', ',']).unwrap_or(rest.len());
        let (key, val, after) = if rest[key_end..].starts_with('=') {
            let (v, after) = value(&rest[key_end + 1..]);
            (rest[..key_end].to_string(), v, after)
        } else {
            match (first, implied) {
                (true, Some(k)) => {
                    let (v, after) = value(rest);
                    (k.to_string(), v, after)
                }
                _ => {
                    return Err(format!(
                        "Expected '=' after parameter '{}'",
                        &rest[..key_end]
                    ))
                }
            }
        };
        first = false;
        put(&mut root, &key, val)?;
        rest = after;
    }
    listify(Value::Object(root), "")
}

/// A value up to an unescaped ',' (`,,` is a comma); returns it and the rest after the ','.
fn value(s: &str) -> (String, &str) {
    let mut v = String::new();
    let mut i = 0;
    let b = s.as_bytes();
    while i < b.len() {
        if b[i] == b',' {
            if b.get(i + 1) == Some(&b',') {
                v.push(',');
                i += 2;
                continue;
            }
            return (v, &s[i + 1..]);
        }
        let ch = s[i..].chars().next().unwrap_or(',');
        v.push(ch);
        i += ch.len_utf8();
    }
    (v, "")
}

fn put(root: &mut Map<String, Value>, key: &str, val: String) -> Result<(), String> {
    let parts: Vec<&str> = key.split('.').collect();
    for (i, p) in parts.iter().enumerate() {
        if !fragment_ok(p, i == 0) {
            return Err(format!("Invalid parameter '{key}'"));
        }
    }
    let mut cur = root;
    for (i, p) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        if last {
            if matches!(cur.get(*p), Some(Value::Object(_))) {
                return Err(format!("Parameters '{key}.*' used inconsistently"));
            }
            cur.insert(p.to_string(), Value::String(val));
            return Ok(());
        }
        let entry = cur
            .entry(p.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        cur = match entry {
            Value::Object(m) => m,
            _ => {
                return Err(format!(
                    "Parameters '{}.*' used inconsistently",
                    parts[..=i].join(".")
                ))
            }
        };
    }
    Ok(())
}

/// QEMU's rule for one dotted fragment of a key (`keyval_parse_one`): a list index (decimal
/// digits) anywhere but first, else a QAPI name, which starts with a letter. So the root is
/// never a list (`0=1` and `0.b=1` are refused, as QEMU refuses them) and `1a` is no name.
/// QAPI's downstream `__RFQDN_` prefix may hold dots, which a dotted key cannot carry apart
/// from its fragments; it is refused here (no sluice option has one).
fn fragment_ok(p: &str, first: bool) -> bool {
    let b = p.as_bytes();
    if !first && !b.is_empty() && b.iter().all(u8::is_ascii_digit) {
        return true;
    }
    b.first().is_some_and(u8::is_ascii_alphabetic)
        && b[1..]
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
}

/// Objects whose keys are all decimal numbers become lists, in index order.
fn listify(v: Value, path: &str) -> Result<Value, String> {
    let Value::Object(m) = v else { return Ok(v) };
    let numeric = !m.is_empty() && m.keys().all(|k| k.bytes().all(|b| b.is_ascii_digit()));
    if numeric {
        let mut items: Vec<(usize, Value)> = Vec::new();
        for (k, e) in m {
            let i: usize = k
                .parse()
                .map_err(|_| format!("Invalid list index '{path}.{k}'"))?;
            let p = format!("{path}.{k}");
            items.push((i, listify(e, p.trim_start_matches('.'))?));
        }
        items.sort_by_key(|(i, _)| *i);
        for (want, (i, _)) in items.iter().enumerate() {
            if *i != want {
                let p = format!("{path}.{want}");
                return Err(format!("Parameter '{}' missing", p.trim_start_matches('.')));
            }
        }
        return Ok(Value::Array(items.into_iter().map(|(_, e)| e).collect()));
    }
    let mut out = Map::new();
    for (k, e) in m {
        let p = format!("{path}.{k}");
        out.insert(k, listify(e, p.trim_start_matches('.'))?);
    }
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parse_dotted_keys_make_nested_objects() {
        assert_eq!(
            parse("addr.type=unix,addr.path=/tmp/s,max-connections=4", None).unwrap(),
            json!({"addr": {"type": "unix", "path": "/tmp/s"}, "max-connections": "4"})
        );
    }

    #[test]
    fn parse_implied_key_takes_first_bare_value() {
        assert_eq!(
            parse("nbd,id=e0,node-name=n", Some("type")).unwrap(),
            json!({"type": "nbd", "id": "e0", "node-name": "n"})
        );
        assert_eq!(
            parse("socket,id=m,path=/x", Some("backend")).unwrap(),
            json!({"backend": "socket", "id": "m", "path": "/x"})
        );
    }

    #[test]
    fn parse_double_comma_is_a_literal_comma() {
        assert_eq!(
            parse("filename=a,,b.img,read-only=on", None).unwrap(),
            json!({"filename": "a,b.img", "read-only": "on"})
        );
    }

    #[test]
    fn parse_numeric_keys_make_lists() {
        assert_eq!(
            parse("plugin=memory,params.0=size=1G,params.1=x", None).unwrap(),
            json!({"plugin": "memory", "params": ["size=1G", "x"]})
        );
        assert_eq!(
            parse("params.1=x", None).unwrap_err(),
            "Parameter 'params.0' missing"
        );
    }

    #[test]
    fn parse_repeated_key_keeps_last_value() {
        assert_eq!(parse("a=1,a=2", None).unwrap(), json!({"a": "2"}));
    }

    #[test]
    fn parse_errors_name_the_parameter() {
        assert_eq!(
            parse("driver", None).unwrap_err(),
            "Expected '=' after parameter 'driver'"
        );
        assert_eq!(
            parse("a..b=1", None).unwrap_err(),
            "Invalid parameter 'a..b'"
        );
        assert_eq!(
            parse("a.b=1,a=2", None).unwrap_err(),
            "Parameters 'a.*' used inconsistently"
        );
        assert_eq!(
            parse("a=2,a.b=1", None).unwrap_err(),
            "Parameters 'a.*' used inconsistently"
        );
    }

    #[test]
    fn parse_root_list_index_is_refused_as_qemu_does() {
        // Found by the keyval fuzz target: the root cannot be a list (QEMU's test-keyval).
        assert_eq!(parse("0=1", None).unwrap_err(), "Invalid parameter '0'");
        assert_eq!(parse("0.b=1", None).unwrap_err(), "Invalid parameter '0.b'");
        assert_eq!(
            parse("a.1b=1", None).unwrap_err(),
            "Invalid parameter 'a.1b'"
        );
        assert_eq!(parse("-a=1", None).unwrap_err(), "Invalid parameter '-a'");
        assert_eq!(parse("a.0.b=1", None).unwrap(), json!({"a": [{"b": "1"}]}));
    }

    #[test]
    fn parse_empty_value_and_trailing_comma() {
        assert_eq!(parse("a=,b=1,", None).unwrap(), json!({"a": "", "b": "1"}));
    }
}
