//! The introspection table (`query-qmp-schema`), in QEMU's `SchemaInfo` format.
//!
//! Commands and events keep their names; every other type gets an opaque number in order of
//! first use, as QEMU does, so that clients follow references instead of relying on type
//! names (which are not ABI). Built-in types appear under their JSON names (`int` for every
//! integer width) and arrays as `[ELEMENT]`. Only types reachable from a command or event
//! are listed. Optional members carry `"default": null`; `features` appear when not empty.
//!
//! The same table is built at compile time for the daemon and at run time by the ABI checker,
//! from the same code, so the baseline and the daemon cannot disagree.

use std::collections::{HashMap, VecDeque};

use serde_json::{json, Map, Value};

use super::model::{builtin_json_type, Kind, Member, Schema, TypeRef};

/// The empty object type used for "no arguments" and "returns nothing".
const EMPTY: &str = "q_empty";

/// Builds the `SchemaInfo` list for `schema`.
pub fn introspect(schema: &Schema) -> Vec<Value> {
    let mut g = Gen {
        schema,
        names: HashMap::new(),
        queue: VecDeque::new(),
        next: 0,
    };
    let mut out = Vec::new();
    for e in &schema.entities {
        let mut entry = Map::new();
        match &e.kind {
            Kind::Command(c) => {
                entry.insert("name".into(), json!(e.name));
                entry.insert("meta-type".into(), json!("command"));
                let arg = g.use_named(c.data.as_deref().unwrap_or(EMPTY));
                entry.insert("arg-type".into(), json!(arg));
                let ret = match &c.returns {
                    Some(r) => g.use_type(r),
                    None => g.use_named(EMPTY),
                };
                entry.insert("ret-type".into(), json!(ret));
                if c.allow_oob {
                    entry.insert("allow-oob".into(), json!(true));
                }
            }
            Kind::Event(ev) => {
                entry.insert("name".into(), json!(e.name));
                entry.insert("meta-type".into(), json!("event"));
                let arg = g.use_named(ev.data.as_deref().unwrap_or(EMPTY));
                entry.insert("arg-type".into(), json!(arg));
            }
            _ => continue,
        }
        features(&mut entry, &e.features);
        out.push(Value::Object(entry));
    }
    while let Some(key) = g.queue.pop_front() {
        let entry = g.entry(&key);
        out.push(entry);
    }
    out
}

struct Gen<'s> {
    schema: &'s Schema,
    /// Type key (a schema name, a builtin JSON name, or `[key]`) to introspection name.
    names: HashMap<String, String>,
    queue: VecDeque<String>,
    next: usize,
}

impl Gen<'_> {
    fn use_type(&mut self, t: &TypeRef) -> String {
        match t {
            TypeRef::Named(n) => self.use_named(n),
            TypeRef::Array(n) => {
                let elem = self.use_named(n);
                let key = format!("[{elem}]");
                if !self.names.contains_key(&key) {
                    self.names.insert(key.clone(), key.clone());
                    self.queue.push_back(key.clone());
                }
                key
            }
        }
    }

    fn use_named(&mut self, n: &str) -> String {
        let key = match builtin_json_type(n) {
            Some(_) => builtin_name(n).to_string(),
            None => n.to_string(),
        };
        if let Some(name) = self.names.get(&key) {
            return name.clone();
        }
        let name = if builtin_json_type(n).is_some() {
            key.clone()
        } else {
            let s = self.next.to_string();
            self.next += 1;
            s
        };
        self.names.insert(key.clone(), name.clone());
        self.queue.push_back(key);
        name
    }

    fn members(&mut self, members: &[&Member]) -> Value {
        let mut list = Vec::new();
        for m in members {
            let mut o = Map::new();
            o.insert("name".into(), json!(m.name));
            o.insert("type".into(), json!(self.use_type(&m.ty)));
            if m.optional {
                o.insert("default".into(), Value::Null);
            }
            features(&mut o, &m.features);
            list.push(Value::Object(o));
        }
        Value::Array(list)
    }

    /// The entry for a type key taken from the queue.
    fn entry(&mut self, key: &str) -> Value {
        let name = self.names[key].clone();
        let mut o = Map::new();
        o.insert("name".into(), json!(name));
        if let Some(elem) = key.strip_prefix('[').and_then(|k| k.strip_suffix(']')) {
            o.insert("meta-type".into(), json!("array"));
            o.insert("element-type".into(), json!(elem));
            return Value::Object(o);
        }
        if key == EMPTY {
            o.insert("meta-type".into(), json!("object"));
            o.insert("members".into(), json!([]));
            return Value::Object(o);
        }
        if let Some(jt) = builtin_json_type(key) {
            o.insert("meta-type".into(), json!("builtin"));
            o.insert("json-type".into(), json!(jt));
            return Value::Object(o);
        }
        let schema = self.schema;
        let e = schema
            .get(key)
            .expect("referenced types were checked to exist");
        match &e.kind {
            Kind::Enum(values) => {
                o.insert("meta-type".into(), json!("enum"));
                let members: Vec<Value> = values
                    .iter()
                    .map(|v| {
                        let mut m = Map::new();
                        m.insert("name".into(), json!(v.name));
                        features(&mut m, &v.features);
                        Value::Object(m)
                    })
                    .collect();
                o.insert("members".into(), Value::Array(members));
                let names: Vec<&str> = values.iter().map(|v| v.name.as_str()).collect();
                o.insert("values".into(), json!(names));
            }
            Kind::Struct(_) => {
                o.insert("meta-type".into(), json!("object"));
                let members = schema.struct_members(key);
                o.insert("members".into(), self.members(&members));
            }
            Kind::Union(u) => {
                o.insert("meta-type".into(), json!("object"));
                let members = schema.struct_members(&u.base);
                o.insert("members".into(), self.members(&members));
                o.insert("tag".into(), json!(u.discriminator));
                let enum_name = members
                    .iter()
                    .find(|m| m.name == u.discriminator)
                    .map(|m| m.ty.name().to_string())
                    .unwrap_or_default();
                let mut variants = Vec::new();
                for v in schema.enum_values(&enum_name) {
                    let ty = match u.variants.iter().find(|b| b.name == v.name) {
                        Some(b) => self.use_named(&b.ty),
                        None => self.use_named(EMPTY),
                    };
                    variants.push(json!({"case": v.name, "type": ty}));
                }
                o.insert("variants".into(), Value::Array(variants));
            }
            Kind::Alternate(branches) => {
                o.insert("meta-type".into(), json!("alternate"));
                let members: Vec<Value> = branches
                    .iter()
                    .map(|b| json!({"type": self.use_named(&b.ty)}))
                    .collect();
                o.insert("members".into(), Value::Array(members));
            }
            Kind::Command(_) | Kind::Event(_) => unreachable!("not a type"),
        }
        features(&mut o, &e.features);
        Value::Object(o)
    }
}

/// The name introspection uses for a built-in type.
fn builtin_name(n: &str) -> &'static str {
    match builtin_json_type(n) {
        Some("int") => "int",
        Some("string") => "str",
        Some("number") => "number",
        Some("boolean") => "bool",
        Some("null") => "null",
        _ => "any",
    }
}

fn features(o: &mut Map<String, Value>, features: &[String]) {
    if !features.is_empty() {
        o.insert("features".into(), json!(features));
    }
}
