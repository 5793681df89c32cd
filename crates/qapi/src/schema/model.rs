//! The checked schema: definitions resolved, conditions applied, rules enforced.
//!
//! [`Schema::load`] follows `include`s from the main file, merges `pragma`s, turns every
//! definition into an [`Entity`] and checks QAPI's rules: naming, reserved names, references,
//! union and alternate shape, command and event argument types, and documentation (every
//! definition documented, every member, value, branch and feature mentioned, and a `Since:`
//! section). Inline argument lists become implicit structs named as QEMU names them
//! (`q_obj_<command>-arg`, `q_obj_<EVENT>-arg`, `q_obj_<Union>-base`), so that everything
//! downstream (code generation, introspection, the ABI checker) sees only named types.
//!
//! `'if'` conditions are evaluated here, against the configuration names the caller enables:
//! a definition, member, value or branch whose condition is false does not exist.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use super::parse::{parse_file, Doc, Expr, Loc, SchemaError, TopExpr};

/// Names of the built-in types and their JSON types (as introspection reports them).
pub fn builtin_json_type(name: &str) -> Option<&'static str> {
    Some(match name {
        "str" => "string",
        "number" => "number",
        "int" | "int8" | "int16" | "int32" | "int64" | "uint8" | "uint16" | "uint32" | "uint64"
        | "size" => "int",
        "bool" => "boolean",
        "null" => "null",
        "any" => "value",
        _ => return None,
    })
}

/// A reference to a type: `'T'` or `['T']`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TypeRef {
    Named(String),
    Array(String),
}

impl TypeRef {
    /// The named type, or the element type of an array.
    pub fn name(&self) -> &str {
        match self {
            TypeRef::Named(n) | TypeRef::Array(n) => n,
        }
    }
}

/// A struct member, command argument or event datum.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub name: String,
    pub ty: TypeRef,
    pub optional: bool,
    pub features: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EnumValue {
    pub name: String,
    pub features: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StructDef {
    pub base: Option<String>,
    /// Own members (not the base's).
    pub members: Vec<Member>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Variant {
    /// The discriminator value (union) or branch name (alternate).
    pub name: String,
    pub ty: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UnionDef {
    /// A struct (possibly implicit) holding the common members.
    pub base: String,
    pub discriminator: String,
    /// Branches with members; enum values without a branch have none here.
    pub variants: Vec<Variant>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CommandDef {
    /// The argument type (a struct, possibly implicit; or a union when boxed).
    pub data: Option<String>,
    pub boxed: bool,
    pub returns: Option<TypeRef>,
    /// False: the handler gets the raw arguments (`'gen': false`).
    pub gen: bool,
    pub allow_oob: bool,
    pub allow_preconfig: bool,
    pub success_response: bool,
    pub coroutine: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EventDef {
    pub data: Option<String>,
    pub boxed: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    Enum(Vec<EnumValue>),
    Struct(StructDef),
    Union(UnionDef),
    Alternate(Vec<Variant>),
    Command(CommandDef),
    Event(EventDef),
}

impl Kind {
    pub fn meta(&self) -> &'static str {
        match self {
            Kind::Enum(_) => "enum",
            Kind::Struct(_) => "struct",
            Kind::Union(_) => "union",
            Kind::Alternate(_) => "alternate",
            Kind::Command(_) => "command",
            Kind::Event(_) => "event",
        }
    }
}

/// A definition.
#[derive(Debug, Clone, PartialEq)]
pub struct Entity {
    pub name: String,
    pub kind: Kind,
    pub features: Vec<String>,
    pub loc: Loc,
    pub doc: Option<Doc>,
    /// Made from an inline member list; named `q_obj_...`.
    pub implicit: bool,
}

/// Pragmas that relax the rules for legacy names.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pragma {
    pub doc_required: bool,
    pub command_name_exceptions: Vec<String>,
    pub command_returns_exceptions: Vec<String>,
    pub member_name_exceptions: Vec<String>,
}

/// Where schema files come from: a directory, or (in tests) a map of names to texts.
pub trait Source {
    /// Reads `name`, resolved relative to `from` (the including file) when given.
    /// Returns the canonical name (for idempotent includes and messages) and the text.
    fn read(&self, name: &str, from: Option<&str>) -> Result<(String, String), String>;
}

/// Files on disk.
pub struct DirSource;

impl Source for DirSource {
    fn read(&self, name: &str, from: Option<&str>) -> Result<(String, String), String> {
        let path = match from.and_then(|f| Path::new(f).parent()) {
            Some(dir) => dir.join(name),
            None => PathBuf::from(name),
        };
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok((path.display().to_string(), text))
    }
}

/// Files in memory, by name (includes are looked up by name alone).
pub struct MemSource<'a>(pub &'a [(&'a str, &'a str)]);

impl Source for MemSource<'_> {
    fn read(&self, name: &str, _from: Option<&str>) -> Result<(String, String), String> {
        self.0
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .ok_or_else(|| format!("{name}: no such file"))
    }
}

/// A checked schema.
#[derive(Debug, Clone, Default)]
pub struct Schema {
    /// Definitions in source order (implicit structs just before their user).
    pub entities: Vec<Entity>,
    pub pragma: Pragma,
    /// Every file read, canonical names.
    pub files: Vec<String>,
    index: HashMap<String, usize>,
}

impl Schema {
    /// Loads `main` and what it includes from `source`; `cfg` says which `'if'` names hold.
    pub fn load(
        source: &dyn Source,
        main: &str,
        cfg: &dyn Fn(&str) -> bool,
    ) -> Result<Schema, SchemaError> {
        let mut b = Builder {
            source,
            cfg,
            schema: Schema::default(),
            seen: HashSet::new(),
            depth: 0,
        };
        b.file(main, None, None)?;
        let schema = b.schema;
        schema.check()?;
        Ok(schema)
    }

    pub fn get(&self, name: &str) -> Option<&Entity> {
        self.index.get(name).map(|&i| &self.entities[i])
    }

    /// All members of struct `name`, base members first.
    pub fn struct_members(&self, name: &str) -> Vec<&Member> {
        let mut chain = Vec::new();
        let mut cur = Some(name);
        let mut guard = 0;
        while let Some(n) = cur {
            guard += 1;
            if guard > 64 {
                break;
            }
            match self.get(n).map(|e| &e.kind) {
                Some(Kind::Struct(s)) => {
                    chain.push(&s.members);
                    cur = s.base.as_deref();
                }
                _ => break,
            }
        }
        chain.into_iter().rev().flatten().collect()
    }

    /// The members every value of object type `name` has: a struct's members, or a union's
    /// base members.
    pub fn common_members(&self, name: &str) -> Vec<&Member> {
        match self.get(name).map(|e| &e.kind) {
            Some(Kind::Struct(_)) => self.struct_members(name),
            Some(Kind::Union(u)) => self.struct_members(&u.base),
            _ => Vec::new(),
        }
    }

    /// The values of enum `name`.
    pub fn enum_values(&self, name: &str) -> &[EnumValue] {
        match self.get(name).map(|e| &e.kind) {
            Some(Kind::Enum(v)) => v,
            _ => &[],
        }
    }

    /// True if `name` is a struct or union (a JSON object type).
    pub fn is_object(&self, name: &str) -> bool {
        matches!(
            self.get(name).map(|e| &e.kind),
            Some(Kind::Struct(_) | Kind::Union(_))
        )
    }

    fn add(&mut self, e: Entity) -> Result<(), SchemaError> {
        if builtin_json_type(&e.name).is_some() {
            return Err(e.loc.error(format!("'{}' is a built-in type", e.name)));
        }
        if let Some(&i) = self.index.get(&e.name) {
            let prev = &self.entities[i].loc;
            return Err(e.loc.error(format!(
                "'{}' is already defined at {}:{}",
                e.name, prev.file, prev.line
            )));
        }
        self.index.insert(e.name.clone(), self.entities.len());
        self.entities.push(e);
        Ok(())
    }

    /// The rules that need the whole schema.
    fn check(&self) -> Result<(), SchemaError> {
        for e in &self.entities {
            self.check_entity(e)?;
        }
        Ok(())
    }

    fn check_type(&self, loc: &Loc, what: &str, ty: &TypeRef) -> Result<(), SchemaError> {
        let n = ty.name();
        if builtin_json_type(n).is_some() {
            return Ok(());
        }
        match self.get(n) {
            None => Err(loc.error(format!("{what} uses unknown type '{n}'"))),
            Some(e) if matches!(e.kind, Kind::Command(_) | Kind::Event(_)) => {
                Err(loc.error(format!(
                    "{what} uses '{n}', which is a {}, not a type",
                    e.kind.meta()
                )))
            }
            Some(_) => Ok(()),
        }
    }

    fn check_members(&self, e: &Entity, members: &[Member]) -> Result<(), SchemaError> {
        let exception = self.pragma.member_name_exceptions.contains(&e.name);
        for m in members {
            check_member_name(&e.loc, &m.name, exception)?;
            self.check_type(
                &e.loc,
                &format!("member '{}' of '{}'", m.name, e.name),
                &m.ty,
            )?;
            check_features(&e.loc, &m.features)?;
        }
        Ok(())
    }

    fn check_entity(&self, e: &Entity) -> Result<(), SchemaError> {
        let loc = &e.loc;
        check_features(loc, &e.features)?;
        match &e.kind {
            Kind::Enum(values) => {
                check_type_name(loc, &e.name, e.implicit)?;
                if values.is_empty() {
                    return Err(loc.error(format!("enum '{}' has no values", e.name)));
                }
                let mut seen = HashSet::new();
                for v in values {
                    if v.name.is_empty()
                        || !v
                            .name
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                    {
                        return Err(
                            loc.error(format!("enum '{}' has bad value '{}'", e.name, v.name))
                        );
                    }
                    if !seen.insert(v.name.as_str()) {
                        return Err(
                            loc.error(format!("enum '{}' has value '{}' twice", e.name, v.name))
                        );
                    }
                    check_features(loc, &v.features)?;
                }
            }
            Kind::Struct(s) => {
                check_type_name(loc, &e.name, e.implicit)?;
                self.check_members(e, &s.members)?;
                if let Some(base) = &s.base {
                    match self.get(base).map(|b| &b.kind) {
                        Some(Kind::Struct(_)) => {}
                        _ => {
                            return Err(
                                loc.error(format!("base '{base}' of '{}' is not a struct", e.name))
                            )
                        }
                    }
                    // Base chains must end.
                    let mut cur = Some(base.as_str());
                    let mut steps = 0;
                    while let Some(b) = cur {
                        if b == e.name || steps > 64 {
                            return Err(loc.error(format!("'{}' is its own base", e.name)));
                        }
                        steps += 1;
                        cur = match self.get(b).map(|x| &x.kind) {
                            Some(Kind::Struct(s)) => s.base.as_deref(),
                            _ => None,
                        };
                    }
                }
                let mut seen = HashSet::new();
                for m in self.struct_members(&e.name) {
                    if !seen.insert(m.name.as_str()) {
                        return Err(loc.error(format!(
                            "member '{}' of '{}' collides with a member of its base",
                            m.name, e.name
                        )));
                    }
                }
            }
            Kind::Union(u) => {
                check_type_name(loc, &e.name, e.implicit)?;
                if !matches!(self.get(&u.base).map(|b| &b.kind), Some(Kind::Struct(_))) {
                    return Err(loc.error(format!(
                        "base '{}' of union '{}' is not a struct",
                        u.base, e.name
                    )));
                }
                let base = self.struct_members(&u.base);
                let disc = base
                    .iter()
                    .find(|m| m.name == u.discriminator)
                    .ok_or_else(|| {
                        loc.error(format!(
                            "discriminator '{}' is not a member of the base of '{}'",
                            u.discriminator, e.name
                        ))
                    })?;
                if disc.optional {
                    return Err(loc.error(format!(
                        "discriminator '{}' must not be optional",
                        u.discriminator
                    )));
                }
                let TypeRef::Named(enum_name) = &disc.ty else {
                    return Err(loc.error(format!(
                        "discriminator '{}' must be an enum",
                        u.discriminator
                    )));
                };
                if !matches!(self.get(enum_name).map(|x| &x.kind), Some(Kind::Enum(_))) {
                    return Err(loc.error(format!(
                        "discriminator '{}' must be an enum",
                        u.discriminator
                    )));
                }
                let values = self.enum_values(enum_name);
                let mut seen = HashSet::new();
                for v in &u.variants {
                    if !values.iter().any(|x| x.name == v.name) {
                        return Err(loc.error(format!(
                            "union '{}' has branch '{}', which is not a value of '{enum_name}'",
                            e.name, v.name
                        )));
                    }
                    if !seen.insert(v.name.as_str()) {
                        return Err(
                            loc.error(format!("union '{}' has branch '{}' twice", e.name, v.name))
                        );
                    }
                    if !matches!(self.get(&v.ty).map(|x| &x.kind), Some(Kind::Struct(_))) {
                        return Err(loc.error(format!(
                            "branch '{}' of union '{}' must be a struct, not '{}'",
                            v.name, e.name, v.ty
                        )));
                    }
                    for m in self.struct_members(&v.ty) {
                        if base.iter().any(|b| b.name == m.name) {
                            return Err(loc.error(format!(
                                "member '{}' of branch '{}' collides with a member of the base of '{}'",
                                m.name, v.name, e.name
                            )));
                        }
                    }
                }
            }
            Kind::Alternate(branches) => {
                check_type_name(loc, &e.name, e.implicit)?;
                if branches.len() < 2 {
                    return Err(loc.error(format!(
                        "alternate '{}' needs at least two branches",
                        e.name
                    )));
                }
                let mut kinds: HashMap<&str, &str> = HashMap::new();
                for b in branches {
                    check_member_name(loc, &b.name, false)?;
                    let kind = match (builtin_json_type(&b.ty), self.get(&b.ty).map(|x| &x.kind)) {
                        (Some("string"), _) | (_, Some(Kind::Enum(_))) => "string",
                        (Some("int" | "number"), _) => "number",
                        (Some("boolean"), _) => "boolean",
                        (Some("null"), _) => "null",
                        (_, Some(Kind::Struct(_) | Kind::Union(_))) => "object",
                        (None, None) => {
                            return Err(loc.error(format!(
                                "branch '{}' of alternate '{}' uses unknown type '{}'",
                                b.name, e.name, b.ty
                            )))
                        }
                        _ => {
                            return Err(loc.error(format!(
                                "branch '{}' of alternate '{}' cannot be '{}'",
                                b.name, e.name, b.ty
                            )))
                        }
                    };
                    if let Some(other) = kinds.insert(kind, &b.name) {
                        return Err(loc.error(format!(
                            "branches '{other}' and '{}' of alternate '{}' are both JSON {kind}s",
                            b.name, e.name
                        )));
                    }
                }
            }
            Kind::Command(c) => {
                let exception = self.pragma.command_name_exceptions.contains(&e.name);
                if !(is_lower_name(&e.name)
                    || exception
                        && e.name.bytes().all(|b| {
                            b.is_ascii_lowercase() || b == b'_' || b == b'-' || b.is_ascii_digit()
                        }))
                {
                    return Err(loc.error(format!(
                        "command name '{}' must be lower-case-with-dashes",
                        e.name
                    )));
                }
                self.check_arg_type(e, c.data.as_deref(), c.boxed)?;
                if let Some(r) = &c.returns {
                    self.check_type(loc, &format!("return type of '{}'", e.name), r)?;
                    let complex = self.is_object(r.name());
                    if !complex && !self.pragma.command_returns_exceptions.contains(&e.name) {
                        return Err(loc.error(format!(
                            "command '{}' must return an object or an array of objects",
                            e.name
                        )));
                    }
                }
                if c.allow_oob && c.coroutine {
                    return Err(loc.error(format!(
                        "command '{}' cannot be both allow-oob and coroutine",
                        e.name
                    )));
                }
            }
            Kind::Event(ev) => {
                if !e
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
                    || !e.name.starts_with(|c: char| c.is_ascii_uppercase())
                {
                    return Err(loc.error(format!("event name '{}' must be ALL_CAPS", e.name)));
                }
                self.check_arg_type(e, ev.data.as_deref(), ev.boxed)?;
            }
        }
        self.check_doc(e)
    }

    fn check_arg_type(
        &self,
        e: &Entity,
        data: Option<&str>,
        boxed: bool,
    ) -> Result<(), SchemaError> {
        let loc = &e.loc;
        let Some(data) = data else {
            if boxed {
                return Err(loc.error(format!("'{}' is boxed but has no 'data'", e.name)));
            }
            return Ok(());
        };
        match self.get(data).map(|x| &x.kind) {
            Some(Kind::Struct(_)) => Ok(()),
            Some(Kind::Union(_)) if boxed => Ok(()),
            Some(Kind::Union(_)) => Err(loc.error(format!(
                "'{}' takes union '{data}' as its arguments and must be 'boxed': true",
                e.name
            ))),
            _ => Err(loc.error(format!(
                "'data' of '{}' must be a struct or union, not '{data}'",
                e.name
            ))),
        }
    }

    /// Documentation: every definition has a block naming it, with a `Since:`, that mentions
    /// each member (or value, or branch) and feature, and nothing else.
    fn check_doc(&self, e: &Entity) -> Result<(), SchemaError> {
        if e.implicit {
            return Ok(());
        }
        let Some(doc) = &e.doc else {
            if self.pragma.doc_required {
                return Err(e
                    .loc
                    .error(format!("documentation comment required for '{}'", e.name)));
            }
            return Ok(());
        };
        let at = Loc {
            file: e.loc.file.clone(),
            line: doc.line,
        };
        if doc.symbol.as_deref() != Some(e.name.as_str()) {
            return Err(at.error(format!(
                "documentation block is for '{}' but the definition is '{}'",
                doc.symbol.as_deref().unwrap_or(""),
                e.name
            )));
        }
        if doc.since.is_none() {
            return Err(at.error(format!(
                "documentation of '{}' lacks a 'Since:' section",
                e.name
            )));
        }
        // The names this block must document: own members, values or branches.
        let names: Vec<String> = match &e.kind {
            Kind::Enum(v) => v.iter().map(|v| v.name.clone()).collect(),
            Kind::Struct(s) => s.members.iter().map(|m| m.name.clone()).collect(),
            Kind::Union(u) => match self.get(&u.base) {
                Some(b) if b.implicit => self
                    .struct_members(&u.base)
                    .iter()
                    .map(|m| m.name.clone())
                    .collect(),
                _ => Vec::new(),
            },
            Kind::Alternate(b) => b.iter().map(|b| b.name.clone()).collect(),
            Kind::Command(CommandDef { data, boxed, .. })
            | Kind::Event(EventDef { data, boxed }) => {
                match data.as_deref().and_then(|d| self.get(d)) {
                    Some(d) if d.implicit && !boxed => self
                        .struct_members(&d.name)
                        .iter()
                        .map(|m| m.name.clone())
                        .collect(),
                    _ => Vec::new(),
                }
            }
        };
        for n in &names {
            if !doc.args.iter().any(|(a, _)| a == n) {
                return Err(at.error(format!("'{n}' of '{}' lacks documentation", e.name)));
            }
        }
        for (a, _) in &doc.args {
            if !names.contains(a) {
                return Err(at.error(format!("documented '@{a}' is not a member of '{}'", e.name)));
            }
        }
        // Features of the definition and of its members and values.
        let mut features: Vec<&String> = e.features.iter().collect();
        match &e.kind {
            Kind::Enum(v) => features.extend(v.iter().flat_map(|v| &v.features)),
            Kind::Struct(s) => features.extend(s.members.iter().flat_map(|m| &m.features)),
            Kind::Command(CommandDef { data: Some(d), .. })
            | Kind::Event(EventDef { data: Some(d), .. }) => {
                if let Some(Entity {
                    implicit: true,
                    kind: Kind::Struct(s),
                    ..
                }) = self.get(d)
                {
                    features.extend(s.members.iter().flat_map(|m| &m.features));
                }
            }
            _ => {}
        }
        for f in &features {
            if !doc.features.iter().any(|(n, _)| n == *f) {
                return Err(at.error(format!("feature '{f}' of '{}' lacks documentation", e.name)));
            }
        }
        for (f, _) in &doc.features {
            if !features.contains(&f) {
                return Err(at.error(format!(
                    "documented feature '{f}' is not a feature of '{}'",
                    e.name
                )));
            }
        }
        Ok(())
    }
}

fn is_lower_name(n: &str) -> bool {
    n.starts_with(|c: char| c.is_ascii_lowercase())
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn check_type_name(loc: &Loc, name: &str, implicit: bool) -> Result<(), SchemaError> {
    if implicit {
        return Ok(());
    }
    if name.starts_with("q_") {
        return Err(loc.error(format!("'{name}' uses the reserved prefix 'q_'")));
    }
    if name.ends_with("List") {
        return Err(loc.error(format!("type name '{name}' must not end in 'List'")));
    }
    if !name.starts_with(|c: char| c.is_ascii_uppercase())
        || !name.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return Err(loc.error(format!("type name '{name}' must be CamelCase")));
    }
    Ok(())
}

fn check_member_name(loc: &Loc, name: &str, exception: bool) -> Result<(), SchemaError> {
    if name == "u" || name.starts_with("has-") || name.starts_with("has_") || name.starts_with("q_")
    {
        return Err(loc.error(format!("member name '{name}' is reserved")));
    }
    let ok = if exception {
        name.starts_with(|c: char| c.is_ascii_alphabetic())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    } else {
        is_lower_name(name)
    };
    if !ok {
        return Err(loc.error(format!(
            "member name '{name}' must be lower-case-with-dashes"
        )));
    }
    Ok(())
}

fn check_features(loc: &Loc, features: &[String]) -> Result<(), SchemaError> {
    let mut seen = HashSet::new();
    for f in features {
        if !is_lower_name(f) {
            return Err(loc.error(format!("feature name '{f}' must be lower-case-with-dashes")));
        }
        if !seen.insert(f) {
            return Err(loc.error(format!("feature '{f}' listed twice")));
        }
    }
    Ok(())
}

/// Turns parsed files into entities.
struct Builder<'a> {
    source: &'a dyn Source,
    cfg: &'a dyn Fn(&str) -> bool,
    schema: Schema,
    seen: HashSet<String>,
    depth: usize,
}

impl Builder<'_> {
    fn file(
        &mut self,
        name: &str,
        from: Option<&str>,
        at: Option<&Loc>,
    ) -> Result<(), SchemaError> {
        let (canon, text) = self.source.read(name, from).map_err(|m| match at {
            Some(l) => l.error(m),
            None => SchemaError {
                at: name.to_string(),
                message: m,
            },
        })?;
        if !self.seen.insert(canon.clone()) {
            return Ok(());
        }
        self.depth += 1;
        if self.depth > 32 {
            return Err(at.map_or_else(
                || SchemaError {
                    at: name.into(),
                    message: "includes nested too deeply".into(),
                },
                |l| l.error("includes nested too deeply"),
            ));
        }
        self.schema.files.push(canon.clone());
        for top in parse_file(&canon, &text)? {
            self.top(&canon, top)?;
        }
        self.depth -= 1;
        Ok(())
    }

    fn top(&mut self, file: &str, top: TopExpr) -> Result<(), SchemaError> {
        let loc = Loc {
            file: file.to_string(),
            line: top.line,
        };
        let Expr::Dict(entries) = top.expr else {
            return Err(loc.error("a top-level expression must be an object"));
        };
        let d = Dict::new(&loc, entries);
        let meta = ["include", "pragma", "enum", "struct", "union", "alternate", "command", "event"]
            .into_iter()
            .find(|k| d.has(k))
            .ok_or_else(|| loc.error("expression has no known meta-type key (enum, struct, union, alternate, command, event, include or pragma)"))?;
        match meta {
            "include" => {
                d.only(&["include"])?;
                let name = d.str("include")?.unwrap_or_default();
                if top.doc.is_some() {
                    return Err(loc.error("'include' cannot be documented"));
                }
                self.file(&name, Some(file), Some(&loc))
            }
            "pragma" => {
                d.only(&["pragma"])?;
                let p = d
                    .dict("pragma")?
                    .unwrap_or_else(|| Dict::new(&loc, Vec::new()));
                p.only(&[
                    "doc-required",
                    "command-name-exceptions",
                    "command-returns-exceptions",
                    "member-name-exceptions",
                    "documentation-exceptions",
                ])?;
                if let Some(b) = p.bool("doc-required")? {
                    self.schema.pragma.doc_required = b;
                }
                let prag = &mut self.schema.pragma;
                prag.command_name_exceptions
                    .extend(p.str_list("command-name-exceptions")?);
                prag.command_returns_exceptions
                    .extend(p.str_list("command-returns-exceptions")?);
                prag.member_name_exceptions
                    .extend(p.str_list("member-name-exceptions")?);
                Ok(())
            }
            _ => self.definition(meta, &loc, d, top.doc),
        }
    }

    fn cond_holds(&self, loc: &Loc, e: Option<&Expr>) -> Result<bool, SchemaError> {
        let Some(e) = e else { return Ok(true) };
        eval_cond(loc, e, self.cfg, 0)
    }

    fn definition(
        &mut self,
        meta: &str,
        loc: &Loc,
        d: Dict,
        doc: Option<Doc>,
    ) -> Result<(), SchemaError> {
        let name = d.str(meta)?.unwrap_or_default();
        if !self.cond_holds(loc, d.get("if"))? {
            return Ok(());
        }
        let features = self.features(loc, d.get("features"))?;
        let kind = match meta {
            "enum" => {
                d.only(&["enum", "data", "prefix", "if", "features"])?;
                let list = d
                    .list("data")?
                    .ok_or_else(|| loc.error(format!("enum '{name}' requires 'data'")))?;
                let mut values = Vec::new();
                for item in list {
                    let (vname, ifc, feats) = match item {
                        Expr::Str(s) => (s.clone(), None, Vec::new()),
                        Expr::Dict(entries) => {
                            let vd = Dict::new(loc, entries.clone());
                            vd.only(&["name", "if", "features"])?;
                            let n = vd
                                .str("name")?
                                .ok_or_else(|| loc.error("enum value needs 'name'"))?;
                            (
                                n,
                                vd.get("if").cloned(),
                                self.features(loc, vd.get("features"))?,
                            )
                        }
                        other => {
                            return Err(loc.error(format!(
                                "enum value must be a string or object, not {}",
                                other.kind()
                            )))
                        }
                    };
                    if self.cond_holds(loc, ifc.as_ref())? {
                        values.push(EnumValue {
                            name: vname,
                            features: feats,
                        });
                    }
                }
                Kind::Enum(values)
            }
            "struct" => {
                d.only(&["struct", "data", "base", "if", "features"])?;
                let members = match d.get("data") {
                    Some(e) => self.members(loc, e)?,
                    None => Vec::new(),
                };
                Kind::Struct(StructDef {
                    base: d.str("base")?,
                    members,
                })
            }
            "union" => {
                d.only(&["union", "base", "discriminator", "data", "if", "features"])?;
                let base = match d.get("base") {
                    Some(Expr::Str(s)) => s.clone(),
                    Some(e @ Expr::Dict(_)) => {
                        let implicit = format!("q_obj_{name}-base");
                        let members = self.members(loc, e)?;
                        self.implicit(loc, &implicit, members)?;
                        implicit
                    }
                    _ => {
                        return Err(loc.error(format!(
                            "union '{name}' requires 'base' (a struct name or members)"
                        )))
                    }
                };
                let discriminator = d
                    .str("discriminator")?
                    .ok_or_else(|| loc.error(format!("union '{name}' requires 'discriminator'")))?;
                let variants = self.branches(loc, &name, d.get("data"))?;
                Kind::Union(UnionDef {
                    base,
                    discriminator,
                    variants,
                })
            }
            "alternate" => {
                d.only(&["alternate", "data", "if", "features"])?;
                Kind::Alternate(self.branches(loc, &name, d.get("data"))?)
            }
            "command" => {
                d.only(&[
                    "command",
                    "data",
                    "boxed",
                    "returns",
                    "success-response",
                    "gen",
                    "allow-oob",
                    "allow-preconfig",
                    "coroutine",
                    "if",
                    "features",
                ])?;
                let boxed = d.bool("boxed")?.unwrap_or(false);
                let data = self.arg_type(loc, &format!("q_obj_{name}-arg"), d.get("data"))?;
                let returns = match d.get("returns") {
                    None => None,
                    Some(e) => Some(type_ref(loc, e)?),
                };
                Kind::Command(CommandDef {
                    data,
                    boxed,
                    returns,
                    gen: d.bool("gen")?.unwrap_or(true),
                    allow_oob: d.bool("allow-oob")?.unwrap_or(false),
                    allow_preconfig: d.bool("allow-preconfig")?.unwrap_or(false),
                    success_response: d.bool("success-response")?.unwrap_or(true),
                    coroutine: d.bool("coroutine")?.unwrap_or(false),
                })
            }
            "event" => {
                d.only(&["event", "data", "boxed", "if", "features"])?;
                let boxed = d.bool("boxed")?.unwrap_or(false);
                let data = self.arg_type(loc, &format!("q_obj_{name}-arg"), d.get("data"))?;
                Kind::Event(EventDef { data, boxed })
            }
            _ => unreachable!(),
        };
        if name.is_empty() {
            return Err(loc.error(format!("'{meta}' needs a name")));
        }
        self.schema.add(Entity {
            name,
            kind,
            features,
            loc: loc.clone(),
            doc,
            implicit: false,
        })
    }

    fn implicit(&mut self, loc: &Loc, name: &str, members: Vec<Member>) -> Result<(), SchemaError> {
        self.schema.add(Entity {
            name: name.to_string(),
            kind: Kind::Struct(StructDef {
                base: None,
                members,
            }),
            features: Vec::new(),
            loc: loc.clone(),
            doc: None,
            implicit: true,
        })
    }

    /// `'data'` of a command or event: a type name, or members (an implicit struct).
    fn arg_type(
        &mut self,
        loc: &Loc,
        implicit: &str,
        e: Option<&Expr>,
    ) -> Result<Option<String>, SchemaError> {
        match e {
            None => Ok(None),
            Some(Expr::Str(s)) => Ok(Some(s.clone())),
            Some(e @ Expr::Dict(_)) => {
                let members = self.members(loc, e)?;
                self.implicit(loc, implicit, members)?;
                Ok(Some(implicit.to_string()))
            }
            Some(other) => Err(loc.error(format!(
                "'data' must be a type name or an object, not {}",
                other.kind()
            ))),
        }
    }

    fn members(&self, loc: &Loc, e: &Expr) -> Result<Vec<Member>, SchemaError> {
        let Expr::Dict(entries) = e else {
            return Err(loc.error(format!("'data' must be an object, not {}", e.kind())));
        };
        let mut out = Vec::new();
        for (key, line, v) in entries {
            let mloc = Loc {
                file: loc.file.clone(),
                line: *line,
            };
            let (name, optional) = match key.strip_prefix('*') {
                Some(n) => (n.to_string(), true),
                None => (key.clone(), false),
            };
            let (ty, ifc, features) = match v {
                Expr::Dict(inner) => {
                    let md = Dict::new(&mloc, inner.clone());
                    md.only(&["type", "if", "features"])?;
                    let ty = md
                        .get("type")
                        .ok_or_else(|| mloc.error(format!("member '{name}' needs 'type'")))?;
                    (
                        type_ref(&mloc, ty)?,
                        md.get("if").cloned(),
                        self.features(&mloc, md.get("features"))?,
                    )
                }
                other => (type_ref(&mloc, other)?, None, Vec::new()),
            };
            if !self.cond_holds(&mloc, ifc.as_ref())? {
                continue;
            }
            if out.iter().any(|m: &Member| m.name == name) {
                return Err(mloc.error(format!("member '{name}' given twice")));
            }
            out.push(Member {
                name,
                ty,
                optional,
                features,
            });
        }
        Ok(out)
    }

    fn branches(
        &self,
        loc: &Loc,
        owner: &str,
        e: Option<&Expr>,
    ) -> Result<Vec<Variant>, SchemaError> {
        let Some(Expr::Dict(entries)) = e else {
            return Err(loc.error(format!("'{owner}' requires 'data' (an object of branches)")));
        };
        let mut out = Vec::new();
        for (key, line, v) in entries {
            let bloc = Loc {
                file: loc.file.clone(),
                line: *line,
            };
            let (ty, ifc) = match v {
                Expr::Str(s) => (s.clone(), None),
                Expr::Dict(inner) => {
                    let bd = Dict::new(&bloc, inner.clone());
                    bd.only(&["type", "if"])?;
                    let ty = bd
                        .str("type")?
                        .ok_or_else(|| bloc.error(format!("branch '{key}' needs 'type'")))?;
                    (ty, bd.get("if").cloned())
                }
                other => {
                    return Err(bloc.error(format!(
                        "branch '{key}' must name a type, not {}",
                        other.kind()
                    )))
                }
            };
            if self.cond_holds(&bloc, ifc.as_ref())? {
                out.push(Variant {
                    name: key.clone(),
                    ty,
                });
            }
        }
        Ok(out)
    }

    fn features(&self, loc: &Loc, e: Option<&Expr>) -> Result<Vec<String>, SchemaError> {
        let Some(e) = e else { return Ok(Vec::new()) };
        let Expr::List(items) = e else {
            return Err(loc.error(format!("'features' must be an array, not {}", e.kind())));
        };
        let mut out = Vec::new();
        for (_, item) in items {
            match item {
                Expr::Str(s) => out.push(s.clone()),
                Expr::Dict(entries) => {
                    let fd = Dict::new(loc, entries.clone());
                    fd.only(&["name", "if"])?;
                    let n = fd
                        .str("name")?
                        .ok_or_else(|| loc.error("feature needs 'name'"))?;
                    if self.cond_holds(loc, fd.get("if"))? {
                        out.push(n);
                    }
                }
                other => {
                    return Err(loc.error(format!(
                        "a feature must be a string or object, not {}",
                        other.kind()
                    )))
                }
            }
        }
        Ok(out)
    }
}

fn type_ref(loc: &Loc, e: &Expr) -> Result<TypeRef, SchemaError> {
    match e {
        Expr::Str(s) => Ok(TypeRef::Named(s.clone())),
        Expr::List(items) => match items.as_slice() {
            [(_, Expr::Str(s))] => Ok(TypeRef::Array(s.clone())),
            _ => Err(loc.error("an array type must be written ['TYPE'] with one type name")),
        },
        other => Err(loc.error(format!(
            "a type must be a name or ['NAME'], not {}",
            other.kind()
        ))),
    }
}

fn eval_cond(
    loc: &Loc,
    e: &Expr,
    cfg: &dyn Fn(&str) -> bool,
    depth: usize,
) -> Result<bool, SchemaError> {
    if depth > 16 {
        return Err(loc.error("'if' condition nested too deeply"));
    }
    match e {
        Expr::Str(s) => Ok(cfg(s)),
        Expr::Dict(entries) if entries.len() == 1 => {
            let (op, _, arg) = &entries[0];
            match (op.as_str(), arg) {
                ("not", a) => Ok(!eval_cond(loc, a, cfg, depth + 1)?),
                ("all", Expr::List(items)) if !items.is_empty() => {
                    let mut r = true;
                    for (_, i) in items {
                        r &= eval_cond(loc, i, cfg, depth + 1)?;
                    }
                    Ok(r)
                }
                ("any", Expr::List(items)) if !items.is_empty() => {
                    let mut r = false;
                    for (_, i) in items {
                        r |= eval_cond(loc, i, cfg, depth + 1)?;
                    }
                    Ok(r)
                }
                _ => Err(loc
                    .error("'if' must be a name, {'not': C}, {'all': [C...]} or {'any': [C...]}")),
            }
        }
        _ => Err(loc.error("'if' must be a name, {'not': C}, {'all': [C...]} or {'any': [C...]}")),
    }
}

/// Typed access to a dict expression, with errors at its location.
struct Dict<'l> {
    loc: &'l Loc,
    entries: Vec<(String, u32, Expr)>,
}

impl<'l> Dict<'l> {
    fn new(loc: &'l Loc, entries: Vec<(String, u32, Expr)>) -> Dict<'l> {
        Dict { loc, entries }
    }

    fn get(&self, key: &str) -> Option<&Expr> {
        self.entries
            .iter()
            .find(|(k, _, _)| k == key)
            .map(|(_, _, v)| v)
    }

    fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    fn only(&self, allowed: &[&str]) -> Result<(), SchemaError> {
        for (k, line, _) in &self.entries {
            if !allowed.contains(&k.as_str()) {
                let at = Loc {
                    file: self.loc.file.clone(),
                    line: *line,
                };
                return Err(at.error(format!(
                    "unknown key '{k}' (expected one of: {})",
                    allowed.join(", ")
                )));
            }
        }
        Ok(())
    }

    fn str(&self, key: &str) -> Result<Option<String>, SchemaError> {
        match self.get(key) {
            None => Ok(None),
            Some(Expr::Str(s)) => Ok(Some(s.clone())),
            Some(e) => Err(self
                .loc
                .error(format!("'{key}' must be a string, not {}", e.kind()))),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, SchemaError> {
        match self.get(key) {
            None => Ok(None),
            Some(Expr::Bool(b)) => Ok(Some(*b)),
            Some(e) => Err(self
                .loc
                .error(format!("'{key}' must be true or false, not {}", e.kind()))),
        }
    }

    fn list(&self, key: &str) -> Result<Option<Vec<&Expr>>, SchemaError> {
        match self.get(key) {
            None => Ok(None),
            Some(Expr::List(items)) => Ok(Some(items.iter().map(|(_, e)| e).collect())),
            Some(e) => Err(self
                .loc
                .error(format!("'{key}' must be an array, not {}", e.kind()))),
        }
    }

    fn str_list(&self, key: &str) -> Result<Vec<String>, SchemaError> {
        let mut out = Vec::new();
        for e in self.list(key)?.unwrap_or_default() {
            match e {
                Expr::Str(s) => out.push(s.clone()),
                other => {
                    return Err(self
                        .loc
                        .error(format!("'{key}' must list strings, not {}", other.kind())))
                }
            }
        }
        Ok(out)
    }

    fn dict(&self, key: &str) -> Result<Option<Dict<'l>>, SchemaError> {
        match self.get(key) {
            None => Ok(None),
            Some(Expr::Dict(entries)) => Ok(Some(Dict::new(self.loc, entries.clone()))),
            Some(e) => Err(self
                .loc
                .error(format!("'{key}' must be an object, not {}", e.kind()))),
        }
    }
}
