//! What the generated code stands on: argument input with QEMU's checks and messages,
//! output with the compatibility policy, and the traits generated types implement.
//!
//! [`Input`] is QEMU's QObject input visitor. It walks a `serde_json::Value` along the schema,
//! keeping the path of member names and list indices so that errors name the exact place
//! (`Parameter 'addr.data' is missing`, `Invalid parameter type for 'enable[0]', expected:
//! string`). Generated parsers check every argument before a command runs, which is what
//! makes "validation before side effects" hold. In *keyval* mode (command-line options such
//! as `--blockdev driver=file,filename=x,read-only=on`) scalars arrive as strings and are
//! converted, with QEMU's keyval messages.
//!
//! [`CompatPolicy`] is QEMU's `-compat`: input marked `deprecated` or `unstable` can be
//! rejected, output marked so can be hidden. Input checks happen here, member by member;
//! [`Output`] applies the output side when generated types are turned into JSON.

use serde_json::{Map, Value};
use sluice_proto::qmp::QmpError;

/// The special features of a definition, member or enum value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Features(pub u8);

impl Features {
    pub const NONE: Features = Features(0);
    pub const DEPRECATED: Features = Features(1);
    pub const UNSTABLE: Features = Features(2);

    pub fn contains(self, f: Features) -> bool {
        self.0 & f.0 == f.0 && f.0 != 0
    }
}

/// What to do with deprecated or unstable input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InputPolicy {
    #[default]
    Accept,
    /// Refuse it with an error.
    Reject,
    /// Abort the process (for testing management software, as QEMU's `crash`).
    Crash,
}

/// What to do with deprecated or unstable output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputPolicy {
    #[default]
    Accept,
    /// Leave it out of replies and events.
    Hide,
}

/// QEMU's `-compat` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CompatPolicy {
    pub deprecated_input: InputPolicy,
    pub deprecated_output: OutputPolicy,
    pub unstable_input: InputPolicy,
    pub unstable_output: OutputPolicy,
}

impl CompatPolicy {
    /// Checks input with `features`; `kind` and `name` word the error ("command
    /// nbd-server-add", "parameter bitmap", "value gluster").
    pub fn check_input(
        &self,
        features: Features,
        kind: &str,
        name: &str,
        class: sluice_proto::qmp::ErrorClass,
    ) -> Result<(), QmpError> {
        for (flag, adjective, policy) in [
            (Features::DEPRECATED, "Deprecated", self.deprecated_input),
            (Features::UNSTABLE, "Unstable", self.unstable_input),
        ] {
            if features.contains(flag) {
                match policy {
                    InputPolicy::Accept => {}
                    InputPolicy::Reject => {
                        return Err(QmpError::new(
                            class,
                            format!("{adjective} {kind} {name} disabled by policy"),
                        ))
                    }
                    InputPolicy::Crash => {
                        tracing::error!(
                            "{adjective} {kind} {name} used: aborting (-compat policy crash)"
                        );
                        std::process::abort();
                    }
                }
            }
        }
        Ok(())
    }

    /// The output side, for generated serialisers.
    pub fn output(&self) -> Output {
        Output {
            hide_deprecated: self.deprecated_output == OutputPolicy::Hide,
            hide_unstable: self.unstable_output == OutputPolicy::Hide,
        }
    }
}

/// Output settings for turning values into JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Output {
    pub hide_deprecated: bool,
    pub hide_unstable: bool,
}

impl Output {
    /// True if a member with `features` is left out.
    pub fn hides(&self, features: Features) -> bool {
        (self.hide_deprecated && features.contains(Features::DEPRECATED))
            || (self.hide_unstable && features.contains(Features::UNSTABLE))
    }

    /// Adds member `name` to `map` unless the policy hides it.
    pub fn member<T: ToQapi + ?Sized>(
        &self,
        map: &mut Map<String, Value>,
        name: &str,
        features: Features,
        value: &T,
    ) {
        if !self.hides(features) {
            map.insert(name.to_string(), value.to_qapi(self));
        }
    }
}

/// One step of the path to the value being read.
#[derive(Debug, Clone, Copy)]
enum Seg {
    Name(&'static str),
    Index(usize),
}

/// QEMU's QObject input visitor (see the module doc).
#[derive(Debug)]
pub struct Input<'p> {
    policy: &'p CompatPolicy,
    keyval: bool,
    path: Vec<Seg>,
}

impl<'p> Input<'p> {
    /// Input from QMP (JSON types must match the schema).
    pub fn json(policy: &'p CompatPolicy) -> Input<'p> {
        Input {
            policy,
            keyval: false,
            path: Vec::new(),
        }
    }

    /// Input from a command-line option in keyval syntax (scalars are strings).
    pub fn keyval(policy: &'p CompatPolicy) -> Input<'p> {
        Input {
            policy,
            keyval: true,
            path: Vec::new(),
        }
    }

    pub fn is_keyval(&self) -> bool {
        self.keyval
    }

    pub fn policy(&self) -> &CompatPolicy {
        self.policy
    }

    /// The dotted path of the current value (`addr.data.path`, `enable[0]`).
    pub fn full_name(&self) -> String {
        let mut s = String::new();
        for seg in &self.path {
            match seg {
                Seg::Name(n) => {
                    if !s.is_empty() {
                        s.push('.');
                    }
                    s.push_str(n);
                }
                Seg::Index(i) if self.keyval => s.push_str(&format!(".{i}")),
                Seg::Index(i) => s.push_str(&format!("[{i}]")),
            }
        }
        s
    }

    fn full_name_with(&self, key: &str) -> String {
        let base = self.full_name();
        if base.is_empty() {
            key.to_string()
        } else {
            format!("{base}.{key}")
        }
    }

    /// The current member's own name (`null` inside a list), as QEMU's scalar checks word it.
    fn last_name(&self) -> &str {
        match self.path.last() {
            Some(Seg::Name(n)) => n,
            _ => "null",
        }
    }

    /// `Invalid parameter type for 'x', expected: WHAT`.
    pub fn type_error(&self, expected: &str) -> QmpError {
        QmpError::generic(format!(
            "Invalid parameter type for '{}', expected: {expected}",
            self.full_name()
        ))
    }

    /// `Parameter 'x' expects WHAT`.
    fn value_error(&self, name: &str, expected: &str) -> QmpError {
        QmpError::generic(format!("Parameter '{name}' expects {expected}"))
    }

    fn with<T>(
        &mut self,
        seg: Seg,
        f: impl FnOnce(&mut Self) -> Result<T, QmpError>,
    ) -> Result<T, QmpError> {
        self.path.push(seg);
        let r = f(self);
        self.path.pop();
        r
    }

    /// Reads optional member `name` of `obj` with `f`.
    pub fn optional<T>(
        &mut self,
        obj: &Map<String, Value>,
        name: &'static str,
        features: Features,
        f: impl FnOnce(&mut Self, &Value) -> Result<T, QmpError>,
    ) -> Result<Option<T>, QmpError> {
        let Some(v) = obj.get(name) else {
            return Ok(None);
        };
        self.with(Seg::Name(name), |inp| {
            inp.check_policy(features, "parameter")?;
            f(inp, v).map(Some)
        })
    }

    /// Reads mandatory member `name` of `obj` with `f`.
    pub fn required<T>(
        &mut self,
        obj: &Map<String, Value>,
        name: &'static str,
        features: Features,
        f: impl FnOnce(&mut Self, &Value) -> Result<T, QmpError>,
    ) -> Result<T, QmpError> {
        match self.optional(obj, name, features, f)? {
            Some(v) => Ok(v),
            None => Err(QmpError::generic(format!(
                "Parameter '{}' is missing",
                self.full_name_with(name)
            ))),
        }
    }

    fn check_policy(&self, features: Features, kind: &str) -> Result<(), QmpError> {
        if features == Features::NONE {
            return Ok(());
        }
        self.policy.check_input(
            features,
            kind,
            &self.full_name(),
            sluice_proto::qmp::ErrorClass::GenericError,
        )
    }

    /// After reading an object's members: any key not in the schema is an error.
    pub fn check_unexpected(
        &self,
        obj: &Map<String, Value>,
        known: impl Fn(&str) -> bool,
    ) -> Result<(), QmpError> {
        match obj.keys().find(|k| !known(k)) {
            Some(k) => Err(QmpError::generic(format!(
                "Parameter '{}' is unexpected",
                self.full_name_with(k)
            ))),
            None => Ok(()),
        }
    }

    pub fn object<'v>(&self, v: &'v Value) -> Result<&'v Map<String, Value>, QmpError> {
        v.as_object().ok_or_else(|| self.type_error("object"))
    }

    /// A list, reading each element with `f`.
    pub fn list<T>(
        &mut self,
        v: &Value,
        mut f: impl FnMut(&mut Self, &Value) -> Result<T, QmpError>,
    ) -> Result<Vec<T>, QmpError> {
        let items = v.as_array().ok_or_else(|| self.type_error("array"))?;
        let mut out = Vec::with_capacity(items.len());
        for (i, e) in items.iter().enumerate() {
            out.push(self.with(Seg::Index(i), |inp| f(inp, e))?);
        }
        Ok(out)
    }

    pub fn str(&self, v: &Value) -> Result<String, QmpError> {
        v.as_str()
            .map(str::to_owned)
            .ok_or_else(|| self.type_error("string"))
    }

    pub fn bool(&self, v: &Value) -> Result<bool, QmpError> {
        if self.keyval {
            if let Some(s) = v.as_str() {
                return match s {
                    "on" | "yes" | "true" | "y" => Ok(true),
                    "off" | "no" | "false" | "n" => Ok(false),
                    _ => Err(self.value_error(&self.full_name(), "'on' or 'off'")),
                };
            }
        }
        v.as_bool().ok_or_else(|| self.type_error("boolean"))
    }

    pub fn int(&self, v: &Value) -> Result<i64, QmpError> {
        if self.keyval {
            if let Some(s) = v.as_str() {
                return parse_c_int(s)
                    .and_then(|x| i64::try_from(x).ok())
                    .ok_or_else(|| self.value_error(&self.full_name(), "integer"));
            }
        }
        v.as_i64().ok_or_else(|| self.type_error("integer"))
    }

    /// A sized signed integer: `int8` ... `int32` (`cname` is QEMU's C type name for errors).
    pub fn int_range(&self, v: &Value, min: i64, max: i64, cname: &str) -> Result<i64, QmpError> {
        let x = self.int(v)?;
        if x < min || x > max {
            return Err(self.value_error(self.last_name(), cname));
        }
        Ok(x)
    }

    /// `uint64`. Like QEMU, a negative JSON integer is taken modulo 2^64.
    pub fn uint(&self, v: &Value) -> Result<u64, QmpError> {
        if self.keyval {
            if let Some(s) = v.as_str() {
                return parse_c_int(s)
                    .and_then(|x| u64::try_from(x).ok())
                    .ok_or_else(|| self.value_error(&self.full_name(), "uint64"));
            }
        }
        if let Some(u) = v.as_u64() {
            return Ok(u);
        }
        if let Some(i) = v.as_i64() {
            return Ok(i as u64);
        }
        Err(self.value_error(&self.full_name(), "uint64"))
    }

    /// `uint8` ... `uint32`.
    pub fn uint_range(&self, v: &Value, max: u64, cname: &str) -> Result<u64, QmpError> {
        let x = self.uint(v)?;
        if x > max {
            return Err(self.value_error(self.last_name(), cname));
        }
        Ok(x)
    }

    /// `size`: like `uint64`; on the command line it takes suffixes (`1G`).
    pub fn size(&self, v: &Value) -> Result<u64, QmpError> {
        if self.keyval {
            if let Some(s) = v.as_str() {
                return parse_size(s)
                    .ok_or_else(|| self.value_error(&self.full_name(), "a size value"));
            }
        }
        self.uint(v)
    }

    pub fn number(&self, v: &Value) -> Result<f64, QmpError> {
        if self.keyval {
            if let Some(s) = v.as_str() {
                return s
                    .parse::<f64>()
                    .ok()
                    .filter(|f| f.is_finite())
                    .ok_or_else(|| self.value_error(&self.full_name(), "number"));
            }
        }
        v.as_f64().ok_or_else(|| self.type_error("number"))
    }

    pub fn null(&self, v: &Value) -> Result<(), QmpError> {
        if v.is_null() {
            Ok(())
        } else {
            Err(self.type_error("null"))
        }
    }

    pub fn any(&self, v: &Value) -> Result<Value, QmpError> {
        Ok(v.clone())
    }

    /// An enum value, checked against the policy for deprecated and unstable values.
    pub fn enumeration<E: QapiEnum>(&self, v: &Value) -> Result<E, QmpError> {
        let s = v.as_str().ok_or_else(|| self.type_error("string"))?;
        let Some(i) = E::VALUES.iter().position(|(n, _)| *n == s) else {
            return Err(QmpError::generic(format!(
                "Parameter '{}' does not accept value '{s}'",
                self.last_name()
            )));
        };
        let features = E::VALUES[i].1;
        if features != Features::NONE {
            self.policy.check_input(
                features,
                "value",
                s,
                sluice_proto::qmp::ErrorClass::GenericError,
            )?;
        }
        Ok(E::from_index(i))
    }
}

/// `strtoll` with base 0 as QEMU's keyval input uses it: decimal, `0x` hex, leading `0` octal.
fn parse_c_int(s: &str) -> Option<i128> {
    let (neg, digits) = match s.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    if digits.is_empty() || digits.starts_with(['+', '-']) {
        return None;
    }
    let v = if let Some(h) = digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        i128::from_str_radix(h, 16).ok()?
    } else if digits.len() > 1 && digits.starts_with('0') {
        i128::from_str_radix(&digits[1..], 8).ok()?
    } else {
        digits.parse::<i128>().ok()?
    };
    Some(if neg { -v } else { v })
}

/// QEMU's `qemu_strtosz`: a number with an optional B/K/M/G/T/P/E suffix (powers of 1024).
fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let shift = match suffix {
        "" | "B" | "b" => 0,
        "K" | "k" => 10,
        "M" | "m" => 20,
        "G" | "g" => 30,
        "T" | "t" => 40,
        "P" | "p" => 50,
        "E" | "e" => 60,
        _ => return None,
    };
    if num.contains('.') {
        let f: f64 = num.parse().ok()?;
        let v = f * (1u64 << shift) as f64;
        return (v.is_finite() && v >= 0.0 && v < u64::MAX as f64).then_some(v as u64);
    }
    let n: u64 = num.parse().ok()?;
    n.checked_mul(1u64 << shift)
}

/// A generated enum.
pub trait QapiEnum: Copy + Sized + 'static {
    /// The values as the wire spells them, with their features, in schema order.
    const VALUES: &'static [(&'static str, Features)];
    fn from_index(i: usize) -> Self;
    fn index(self) -> usize;
    fn as_str(self) -> &'static str {
        Self::VALUES[self.index()].0
    }
}

/// A generated object, alternate or enum that can be read from JSON.
pub trait FromQapi: Sized {
    fn from_qapi(inp: &mut Input<'_>, v: &Value) -> Result<Self, QmpError>;
}

/// Anything that becomes JSON in a reply or event.
pub trait ToQapi {
    fn to_qapi(&self, out: &Output) -> Value;
}

impl ToQapi for str {
    fn to_qapi(&self, _: &Output) -> Value {
        Value::String(self.to_owned())
    }
}

impl ToQapi for String {
    fn to_qapi(&self, _: &Output) -> Value {
        Value::String(self.clone())
    }
}

macro_rules! to_qapi_number {
    ($($t:ty),*) => {$(
        impl ToQapi for $t {
            fn to_qapi(&self, _: &Output) -> Value {
                Value::from(*self)
            }
        }
    )*};
}
to_qapi_number!(i8, i16, i32, i64, u8, u16, u32, u64, f64, bool);

impl ToQapi for () {
    fn to_qapi(&self, _: &Output) -> Value {
        Value::Null
    }
}

impl ToQapi for Value {
    fn to_qapi(&self, _: &Output) -> Value {
        self.clone()
    }
}

impl<T: ToQapi> ToQapi for Vec<T> {
    fn to_qapi(&self, out: &Output) -> Value {
        Value::Array(self.iter().map(|e| e.to_qapi(out)).collect())
    }
}

impl<T: ToQapi + ?Sized> ToQapi for Box<T> {
    fn to_qapi(&self, out: &Output) -> Value {
        (**self).to_qapi(out)
    }
}

/// A generated event.
pub trait QapiEvent {
    /// The event name on the wire (`BLOCK_EXPORT_DELETED`).
    const NAME: &'static str;
    /// `data`, or None for events without data.
    fn data(&self, out: &Output) -> Option<Value>;
}

/// A command as the dispatcher sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandDef {
    pub name: &'static str,
    pub features: Features,
    pub allow_oob: bool,
    pub allow_preconfig: bool,
}

/// An event as listed in the schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventDef {
    pub name: &'static str,
    pub features: Features,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn full_name_uses_dots_and_brackets() {
        let p = CompatPolicy::default();
        let mut inp = Input::json(&p);
        let obj = json!({"addr": {"data": [{"path": 1}]}});
        let err = inp
            .required(
                obj.as_object().unwrap(),
                "addr",
                Features::NONE,
                |inp, v| {
                    let o = inp.object(v)?;
                    inp.required(o, "data", Features::NONE, |inp, v| {
                        inp.list(v, |inp, e| {
                            let o = inp.object(e)?;
                            inp.required(o, "path", Features::NONE, |inp, v| inp.str(v))
                        })
                    })
                },
            )
            .unwrap_err();
        assert_eq!(
            err.desc,
            "Invalid parameter type for 'addr.data[0].path', expected: string"
        );
    }

    #[test]
    fn required_missing_names_the_full_path() {
        let p = CompatPolicy::default();
        let mut inp = Input::json(&p);
        let obj = json!({"addr": {}});
        let err = inp
            .required(
                obj.as_object().unwrap(),
                "addr",
                Features::NONE,
                |inp, v| {
                    let o = inp.object(v)?;
                    inp.required(o, "data", Features::NONE, |inp, v| inp.str(v))
                },
            )
            .unwrap_err();
        assert_eq!(err.desc, "Parameter 'addr.data' is missing");
    }

    #[test]
    fn uint_range_error_uses_the_member_name_and_c_type() {
        let p = CompatPolicy::default();
        let mut inp = Input::json(&p);
        let obj = json!({"max-connections": -1});
        let err = inp
            .required(
                obj.as_object().unwrap(),
                "max-connections",
                Features::NONE,
                |inp, v| inp.uint_range(v, u32::MAX as u64, "uint32_t"),
            )
            .unwrap_err();
        assert_eq!(err.desc, "Parameter 'max-connections' expects uint32_t");
    }

    #[test]
    fn int_rejects_floats_and_large_unsigned() {
        let p = CompatPolicy::default();
        let inp = Input::json(&p);
        assert!(inp.int(&json!(1.0)).is_err());
        assert!(inp.int(&json!(u64::MAX)).is_err());
        assert_eq!(inp.uint(&json!(-1)).unwrap(), u64::MAX);
        assert_eq!(
            inp.uint(&json!(1.5)).unwrap_err().desc,
            "Parameter '' expects uint64"
        );
    }

    #[test]
    fn keyval_scalars_are_converted_from_strings() {
        let p = CompatPolicy::default();
        let inp = Input::keyval(&p);
        assert!(inp.bool(&json!("on")).unwrap());
        assert!(!inp.bool(&json!("off")).unwrap());
        assert_eq!(inp.int(&json!("0x10")).unwrap(), 16);
        assert_eq!(inp.int(&json!("-5")).unwrap(), -5);
        assert_eq!(inp.size(&json!("1G")).unwrap(), 1 << 30);
        assert_eq!(inp.size(&json!("1.5K")).unwrap(), 1536);
        assert_eq!(
            inp.bool(&json!("maybe")).unwrap_err().desc,
            "Parameter '' expects 'on' or 'off'"
        );
        assert!(inp.int(&json!("12abc")).is_err());
    }

    #[test]
    fn check_input_rejects_deprecated_when_asked() {
        let p = CompatPolicy {
            deprecated_input: InputPolicy::Reject,
            ..CompatPolicy::default()
        };
        let e = p
            .check_input(
                Features::DEPRECATED,
                "command",
                "nbd-server-add",
                sluice_proto::qmp::ErrorClass::CommandNotFound,
            )
            .unwrap_err();
        assert_eq!(
            e.desc,
            "Deprecated command nbd-server-add disabled by policy"
        );
        assert!(p
            .check_input(
                Features::UNSTABLE,
                "command",
                "x",
                sluice_proto::qmp::ErrorClass::CommandNotFound
            )
            .is_ok());
    }

    #[test]
    fn output_hides_deprecated_members_when_asked() {
        let out = Output {
            hide_deprecated: true,
            hide_unstable: false,
        };
        let mut m = Map::new();
        out.member(&mut m, "a", Features::DEPRECATED, &1i64);
        out.member(&mut m, "b", Features::NONE, &2i64);
        assert_eq!(Value::Object(m), json!({"b": 2}));
    }
}
