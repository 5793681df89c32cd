//! A QMP command's arguments from the command line: `key=value` words or one JSON object.
//!
//! The rule is written once here and quoted in `sluice qmp --help` ([`RULE`]):
//!
//! - One word that starts with `{` is the whole `arguments` object, as JSON.
//! - Otherwise every word is `KEY=VALUE` (split at the first `=`). A value that is valid JSON
//!   is taken as that JSON value (`speed=1048576` a number, `read-only=true` a boolean,
//!   `backing=null` null, `"10"` in quotes a string); anything else is the string as written
//!   (`device=top`). A value starting with `{` or `[` must be valid JSON: it is clearly meant
//!   as an object or array, so a typo there is an error, not a string.
//! - Dotted keys build nested objects, as QEMU's keyval does: `file.driver=file
//!   file.filename=a.img` gives `{"file": {"driver": "file", "filename": "a.img"}}`. An object
//!   built this way whose keys are exactly `0`, `1`, ... `n-1` becomes an array
//!   (`children.0=a children.1=b`). A dotted key may also add members to an object given as
//!   JSON (`file={"driver":"file"} file.filename=a.img`).
//! - Giving the same key twice, or a key both as a value and as an object, is an error.
//!
//! Parsing is pure and happens before connecting, so a bad argument never reaches the
//! server: the caller turns [`ArgError`] into one `sluice:` line and exit status 2.

use serde_json::{Map, Value};

/// The rule as `--help` shows it.
pub const RULE: &str = "\
Arguments are KEY=VALUE words or one JSON object ('{\"device\": \"top\"}'). A VALUE that is
valid JSON is that JSON value (speed=1048576, read-only=true, backing=null, '\"10\"' in quotes
for the string \"10\"); anything else is the string as written (device=top). A VALUE that
starts with { or [ must be valid JSON. Dotted keys build objects, as in QEMU's keyval
(file.driver=file file.filename=a.img); an object whose keys are 0, 1, ... n-1 becomes an
array (children.0=a children.1=b). A key given twice is an error.";

/// Why the words do not make an arguments object. The text names the word and the problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgError(pub String);

impl std::fmt::Display for ArgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The `arguments` object for `words` (see the module doc for the rule).
pub fn parse(words: &[String]) -> Result<Map<String, Value>, ArgError> {
    if let [only] = words {
        if only.trim_start().starts_with('{') {
            return match serde_json::from_str::<Value>(only) {
                Ok(Value::Object(m)) => Ok(m),
                Ok(_) => Err(ArgError("the JSON arguments are not an object".into())),
                Err(e) => Err(ArgError(format!("bad JSON arguments: {e}"))),
            };
        }
    }
    let mut root = Map::new();
    // Objects made by dotted keys (as paths), the only ones that may turn into arrays.
    let mut dotted: Vec<Vec<String>> = Vec::new();
    for word in words {
        let Some((key, text)) = word.split_once('=') else {
            let hint = if word.trim_start().starts_with('{') {
                " (JSON arguments must be the only argument)"
            } else {
                ""
            };
            return Err(ArgError(format!(
                "argument '{word}' is not KEY=VALUE{hint}"
            )));
        };
        let path: Vec<&str> = key.split('.').collect();
        if path.iter().any(|p| p.is_empty()) {
            return Err(ArgError(format!(
                "bad key '{key}' in '{word}': empty name between dots"
            )));
        }
        let value = value_of(key, text)?;
        insert(&mut root, &path, value, key, &mut dotted)?;
    }
    // Deepest first, so that an array's elements are converted before the array itself.
    dotted.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
    dotted.dedup();
    for path in dotted {
        listify(&mut root, &path);
    }
    Ok(root)
}

/// A value as the rule reads it.
fn value_of(key: &str, text: &str) -> Result<Value, ArgError> {
    match serde_json::from_str::<Value>(text) {
        Ok(v) => Ok(v),
        Err(e) if text.trim_start().starts_with(['{', '[']) => {
            Err(ArgError(format!("bad JSON in the value of '{key}': {e}")))
        }
        Err(_) => Ok(Value::String(text.to_string())),
    }
}

/// Puts `value` at `path` under `obj`, creating objects on the way (and noting them in
/// `dotted`).
fn insert(
    obj: &mut Map<String, Value>,
    path: &[&str],
    value: Value,
    key: &str,
    dotted: &mut Vec<Vec<String>>,
) -> Result<(), ArgError> {
    let mut cur = obj;
    for (i, name) in path.iter().enumerate() {
        let prefix = path[..=i].join(".");
        if i + 1 == path.len() {
            if cur.contains_key(*name) {
                return Err(ArgError(format!("'{prefix}' is given twice")));
            }
            cur.insert(name.to_string(), value);
            return Ok(());
        }
        let next = cur
            .entry(name.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        let Value::Object(m) = next else {
            return Err(ArgError(format!(
                "'{prefix}' is given as a value and as an object (in '{key}')"
            )));
        };
        dotted.push(path[..=i].iter().map(|s| s.to_string()).collect());
        cur = m;
    }
    unreachable!("paths have at least one name")
}

/// Turns the object at `path` into an array if its keys are exactly `0..n`.
fn listify(root: &mut Map<String, Value>, path: &[String]) {
    let (last, parents) = path.split_last().expect("non-empty path");
    let mut cur = root;
    for name in parents {
        match cur.get_mut(name) {
            Some(Value::Object(m)) => cur = m,
            // An ancestor already became an array: its elements are reached by index, and
            // were converted first (deepest paths go first), so nothing is left to do.
            _ => return,
        }
    }
    let Some(Value::Object(m)) = cur.get_mut(last) else {
        return;
    };
    let is_list = !m.is_empty()
        && (0..m.len()).all(|i| m.contains_key(&i.to_string()))
        && m.keys().all(|k| k == "0" || !k.starts_with('0'));
    if is_list {
        let mut m = std::mem::take(m);
        let items: Vec<Value> = (0..m.len())
            .map(|i| m.shift_remove(&i.to_string()).expect("checked above"))
            .collect();
        cur.insert(last.clone(), Value::Array(items));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn words(w: &[&str]) -> Vec<String> {
        w.iter().map(|s| s.to_string()).collect()
    }

    fn ok(w: &[&str]) -> Value {
        Value::Object(parse(&words(w)).unwrap())
    }

    fn err(w: &[&str]) -> String {
        parse(&words(w)).unwrap_err().0
    }

    #[test]
    fn parse_no_words_gives_empty_object() {
        assert_eq!(ok(&[]), json!({}));
    }

    #[test]
    fn parse_values_json_when_valid_else_strings() {
        assert_eq!(
            ok(&[
                "device=top",
                "speed=1048576",
                "read-only=true",
                "backing=null",
                "name=\"10\"",
                "n=-1.5",
                "base-node=",
                "filename=a=b.img",
            ]),
            json!({"device": "top", "speed": 1048576, "read-only": true, "backing": null,
                   "name": "10", "n": -1.5, "base-node": "", "filename": "a=b.img"})
        );
    }

    #[test]
    fn parse_value_json_object_and_array() {
        assert_eq!(
            ok(&["file={\"driver\": \"file\"}", "list=[1, \"a\"]"]),
            json!({"file": {"driver": "file"}, "list": [1, "a"]})
        );
    }

    #[test]
    fn parse_dotted_keys_nest_in_order() {
        assert_eq!(
            ok(&[
                "driver=qcow2",
                "file.driver=file",
                "file.filename=a.img",
                "node-name=n"
            ]),
            json!({"driver": "qcow2", "file": {"driver": "file", "filename": "a.img"},
                   "node-name": "n"})
        );
    }

    #[test]
    fn parse_numbered_keys_become_arrays_even_nested() {
        assert_eq!(
            ok(&["c.1.x=b", "c.0.x=a", "c.0.y.0=z"]),
            json!({"c": [{"x": "a", "y": ["z"]}, {"x": "b"}]})
        );
        // Not 0..n: stays an object.
        assert_eq!(ok(&["c.1=a"]), json!({"c": {"1": "a"}}));
        assert_eq!(ok(&["c.0=a", "c.x=b"]), json!({"c": {"0": "a", "x": "b"}}));
        assert_eq!(
            ok(&["c.0=a", "c.01=b"]),
            json!({"c": {"0": "a", "01": "b"}})
        );
    }

    #[test]
    fn parse_dotted_key_extends_json_object_but_not_json_array_index() {
        assert_eq!(
            ok(&["file={\"driver\": \"file\"}", "file.filename=a"]),
            json!({"file": {"driver": "file", "filename": "a"}})
        );
    }

    #[test]
    fn parse_json_object_word() {
        assert_eq!(
            ok(&[" {\"device\": \"top\", \"speed\": 5}"]),
            json!({"device": "top", "speed": 5})
        );
    }

    #[test]
    fn parse_bad_inputs_name_the_problem() {
        assert!(err(&["{\"device\": }"]).starts_with("bad JSON arguments: expected value"));
        assert_eq!(
            err(&["{\"a\": 1}", "b=2"]),
            "argument '{\"a\": 1}' is not KEY=VALUE (JSON arguments must be the only argument)"
        );
        assert_eq!(err(&["device"]), "argument 'device' is not KEY=VALUE");
        assert_eq!(
            err(&["file={\"driver\": file}"]),
            "bad JSON in the value of 'file': expected ident at line 1 column 13"
        );
        assert!(err(&["l=[1,"]).starts_with("bad JSON in the value of 'l'"));
        assert_eq!(err(&["a=1", "a=2"]), "'a' is given twice");
        assert_eq!(
            err(&["a=1", "a.b=2"]),
            "'a' is given as a value and as an object (in 'a.b')"
        );
        assert_eq!(err(&["a.b=1", "a=2"]), "'a' is given twice");
        assert_eq!(
            err(&["a..b=1"]),
            "bad key 'a..b' in 'a..b=1': empty name between dots"
        );
        assert_eq!(err(&["=1"]), "bad key '' in '=1': empty name between dots");
    }
}
