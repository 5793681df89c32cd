//! The schema ABI checker: what changed between a recorded baseline and the schema now, and
//! which changes break clients.
//!
//! Both sides are introspection tables (`query-qmp-schema` output), so the checker sees the
//! schema exactly as clients do: type names are opaque and not compared; it starts at every
//! command and event of the baseline and follows references on both sides in step. Each
//! comparison has a direction, because compatibility is not symmetric:
//!
//! - **input** (command arguments, what clients send): the new schema must accept everything
//!   the old one did. Breaking: a member removed, a type changed, an optional member made
//!   mandatory, a new mandatory member, an enum value removed, an alternate branch dropped.
//!   Fine: new optional members, mandatory made optional, a type widened into an alternate
//!   that still accepts it.
//! - **output** (replies and events, what clients read): the new schema must not surprise old
//!   clients. Breaking: a member removed, a type changed, a member that was always present
//!   made optional (the return shape narrowed), an enum value removed. Fine: new members.
//!
//! Removing a command, event, member or enum value is allowed when the baseline already
//! marked it `deprecated` (the deprecation policy: one release of warning); such removals are
//! reported as notes. Renaming is a removal plus an addition, and is reported as the removal.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// What a finding is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rule {
    CommandRemoved,
    EventRemoved,
    MemberRemoved,
    TypeChanged,
    OptionalBecameMandatory,
    MandatoryMemberAdded,
    EnumValueRemoved,
    ReturnNarrowed,
    /// Not breaking: something marked deprecated in the baseline is gone.
    RemovedAfterDeprecation,
}

impl Rule {
    /// A short name for reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::CommandRemoved => "command-removed",
            Rule::EventRemoved => "event-removed",
            Rule::MemberRemoved => "member-removed",
            Rule::TypeChanged => "type-changed",
            Rule::OptionalBecameMandatory => "optional-became-mandatory",
            Rule::MandatoryMemberAdded => "mandatory-member-added",
            Rule::EnumValueRemoved => "enum-value-removed",
            Rule::ReturnNarrowed => "return-narrowed",
            Rule::RemovedAfterDeprecation => "removed-after-deprecation",
        }
    }

    pub fn is_breaking(self) -> bool {
        self != Rule::RemovedAfterDeprecation
    }
}

/// One difference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub rule: Rule,
    /// Where: `command 'blockdev-add' arguments: member 'file'`.
    pub path: String,
    pub detail: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = if self.rule.is_breaking() {
            "BREAKING"
        } else {
            "note"
        };
        write!(
            f,
            "{level} [{}] {}: {}",
            self.rule.as_str(),
            self.path,
            self.detail
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Dir {
    Input,
    Output,
}

/// Compares two introspection tables; findings in a stable order.
pub fn compare(old: &[Value], new: &[Value]) -> Vec<Finding> {
    let mut c = Cmp {
        old: index(old),
        new: index(new),
        findings: Vec::new(),
        seen: HashSet::new(),
    };
    for e in old {
        let name = s(e, "name");
        match s(e, "meta-type") {
            "command" => match c.new.get(name).filter(|n| s(n, "meta-type") == "command") {
                None => c.removed(
                    e,
                    Rule::CommandRemoved,
                    format!("command '{name}'"),
                    "the command was removed",
                ),
                Some(n) => {
                    let n = *n;
                    let args = format!("command '{name}' arguments");
                    c.ty(Dir::Input, s(e, "arg-type"), s(n, "arg-type"), &args);
                    let ret = format!("command '{name}' return");
                    c.ty(Dir::Output, s(e, "ret-type"), s(n, "ret-type"), &ret);
                }
            },
            "event" => match c.new.get(name).filter(|n| s(n, "meta-type") == "event") {
                None => c.removed(
                    e,
                    Rule::EventRemoved,
                    format!("event '{name}'"),
                    "the event was removed",
                ),
                Some(n) => {
                    let n = *n;
                    let data = format!("event '{name}' data");
                    c.ty(Dir::Output, s(e, "arg-type"), s(n, "arg-type"), &data);
                }
            },
            _ => {}
        }
    }
    c.findings
}

fn index(entries: &[Value]) -> HashMap<&str, &Value> {
    entries.iter().map(|e| (s(e, "name"), e)).collect()
}

fn s<'v>(v: &'v Value, key: &str) -> &'v str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

fn deprecated(v: &Value) -> bool {
    v.get("features")
        .and_then(Value::as_array)
        .is_some_and(|f| f.iter().any(|x| x == "deprecated"))
}

/// A member as the comparison needs it.
struct M<'v> {
    name: &'v str,
    ty: &'v str,
    optional: bool,
    entry: &'v Value,
}

struct Cmp<'v> {
    old: HashMap<&'v str, &'v Value>,
    new: HashMap<&'v str, &'v Value>,
    findings: Vec<Finding>,
    seen: HashSet<(String, String, Dir)>,
}

impl<'v> Cmp<'v> {
    fn report(&mut self, rule: Rule, path: &str, detail: impl Into<String>) {
        self.findings.push(Finding {
            rule,
            path: path.to_string(),
            detail: detail.into(),
        });
    }

    fn removed(&mut self, old: &Value, rule: Rule, path: String, what: &str) {
        if deprecated(old) {
            self.report(
                Rule::RemovedAfterDeprecation,
                &path,
                format!("{what} (it was deprecated)"),
            );
        } else {
            self.report(
                rule,
                &path,
                format!("{what}; removing needs the 'deprecated' feature for at least one release first"),
            );
        }
    }

    /// A trial comparison: true if `o` and `n` are compatible in `dir`. Pairs already being
    /// compared are assumed compatible, so recursive types end.
    fn compatible(&self, dir: Dir, o: &str, n: &str) -> bool {
        let mut t = Cmp {
            old: self.old.clone(),
            new: self.new.clone(),
            findings: Vec::new(),
            seen: self.seen.clone(),
        };
        t.ty(dir, o, n, "");
        !t.findings.iter().any(|f| f.rule.is_breaking())
    }

    fn describe(table: &HashMap<&str, &Value>, t: &str) -> String {
        match table.get(t) {
            Some(e) => match s(e, "meta-type") {
                "builtin" => s(e, "json-type").to_string(),
                "array" => format!("array of {}", Self::describe(table, s(e, "element-type"))),
                m => m.to_string(),
            },
            None => "unknown".to_string(),
        }
    }

    fn ty(&mut self, dir: Dir, o: &str, n: &str, path: &str) {
        if !self.seen.insert((o.to_string(), n.to_string(), dir)) {
            return;
        }
        let (Some(oe), Some(ne)) = (self.old.get(o).copied(), self.new.get(n).copied()) else {
            self.report(Rule::TypeChanged, path, "type reference cannot be resolved");
            return;
        };
        let (om, nm) = (s(oe, "meta-type"), s(ne, "meta-type"));
        let changed = |c: &mut Self| {
            let d = format!(
                "type changed from {} to {}",
                Self::describe(&c.old, o),
                Self::describe(&c.new, n)
            );
            c.report(Rule::TypeChanged, path, d);
        };
        match (dir, om, nm) {
            (_, "alternate", "alternate") => {
                // Input: every old branch still accepted. Output: every new branch understood.
                let (from, to) = match dir {
                    Dir::Input => (branches(oe), branches(ne)),
                    Dir::Output => (branches(ne), branches(oe)),
                };
                for b in from {
                    let ok = to.iter().any(|t| match dir {
                        Dir::Input => self.compatible(dir, b, t),
                        Dir::Output => self.compatible(dir, t, b),
                    });
                    if !ok {
                        let d = match dir {
                            Dir::Input => format!(
                                "alternate no longer accepts {}",
                                Self::describe(&self.old, b)
                            ),
                            Dir::Output => {
                                format!("alternate may now be {}", Self::describe(&self.new, b))
                            }
                        };
                        self.report(Rule::TypeChanged, path, d);
                    }
                }
            }
            (Dir::Input, _, "alternate") => {
                if !branches(ne).iter().any(|b| self.compatible(dir, o, b)) {
                    changed(self);
                }
            }
            (Dir::Output, "alternate", _) => {
                if !branches(oe).iter().any(|b| self.compatible(dir, b, n)) {
                    changed(self);
                }
            }
            (_, "builtin", "builtin") => {
                let (oj, nj) = (s(oe, "json-type"), s(ne, "json-type"));
                let ok = oj == nj
                    || match dir {
                        Dir::Input => nj == "value" || (oj == "int" && nj == "number"),
                        Dir::Output => oj == "value" || (oj == "number" && nj == "int"),
                    };
                if !ok {
                    changed(self);
                }
            }
            (_, "enum", "enum") => {
                let new_values: Vec<&str> = enum_members(ne).iter().map(|(n, _)| *n).collect();
                for (v, entry) in enum_members(oe) {
                    if !new_values.contains(&v) {
                        self.removed(
                            entry,
                            Rule::EnumValueRemoved,
                            path.to_string(),
                            &format!("enum value '{v}' was removed"),
                        );
                    }
                }
            }
            // An enum where a string was (input narrows) or the reverse (output widens).
            (Dir::Input, "enum", "builtin") | (Dir::Output, "builtin", "enum")
                if s(if om == "builtin" { oe } else { ne }, "json-type") == "string" => {}
            (_, "array", "array") => {
                let (oel, nel) = (s(oe, "element-type"), s(ne, "element-type"));
                self.ty(dir, oel, nel, &format!("{path}[]"));
            }
            (_, "object", "object") => self.object(dir, oe, ne, path),
            _ => changed(self),
        }
    }

    /// Common members plus the members of variant `case`.
    fn members(
        &self,
        table: &HashMap<&'v str, &'v Value>,
        e: &'v Value,
        case: Option<&str>,
    ) -> Vec<M<'v>> {
        let mut out: Vec<M<'v>> = object_members(e);
        if let Some(case) = case {
            let variant = e
                .get("variants")
                .and_then(Value::as_array)
                .and_then(|vs| vs.iter().find(|v| s(v, "case") == case));
            if let Some(v) = variant {
                if let Some(ve) = table.get(s(v, "type")) {
                    out.extend(object_members(ve));
                }
            }
        }
        out
    }

    fn object(&mut self, dir: Dir, oe: &'v Value, ne: &'v Value, path: &str) {
        let old_cases: Vec<&str> = cases(oe);
        let new_cases: Vec<&str> = cases(ne);
        if old_cases.is_empty() {
            let (om, nm) = (
                self.members(&self.old, oe, None),
                self.members(&self.new, ne, None),
            );
            self.member_lists(dir, om, nm, path);
            return;
        }
        let tag = s(oe, "tag");
        for case in old_cases {
            if !new_cases.contains(&case) && !new_cases.is_empty() {
                // The tag's enum lost the value; reported by the enum comparison.
                continue;
            }
            let om = self.members(&self.old, oe, Some(case));
            let nm = self.members(&self.new, ne, Some(case).filter(|_| !new_cases.is_empty()));
            self.member_lists(dir, om, nm, &format!("{path} ({tag}={case})"));
        }
    }

    fn member_lists(&mut self, dir: Dir, om: Vec<M<'v>>, nm: Vec<M<'v>>, path: &str) {
        for m in &om {
            let mpath = format!("{path}: member '{}'", m.name);
            let Some(n) = nm.iter().find(|n| n.name == m.name) else {
                self.removed(
                    m.entry,
                    Rule::MemberRemoved,
                    mpath,
                    "the member was removed",
                );
                continue;
            };
            match dir {
                Dir::Input if m.optional && !n.optional => {
                    self.report(
                        Rule::OptionalBecameMandatory,
                        &mpath,
                        "an optional member became mandatory",
                    );
                }
                Dir::Output if !m.optional && n.optional => {
                    self.report(
                        Rule::ReturnNarrowed,
                        &mpath,
                        "a member that was always present may now be absent",
                    );
                }
                _ => {}
            }
            self.ty(dir, m.ty, n.ty, &mpath);
        }
        if dir == Dir::Input {
            for n in &nm {
                if !n.optional && !om.iter().any(|m| m.name == n.name) {
                    self.report(
                        Rule::MandatoryMemberAdded,
                        &format!("{path}: member '{}'", n.name),
                        "a new member is mandatory; old clients do not send it",
                    );
                }
            }
        }
    }
}

fn object_members(e: &Value) -> Vec<M<'_>> {
    e.get("members")
        .and_then(Value::as_array)
        .map(|ms| {
            ms.iter()
                .map(|m| M {
                    name: s(m, "name"),
                    ty: s(m, "type"),
                    optional: m.get("default").is_some(),
                    entry: m,
                })
                .collect()
        })
        .unwrap_or_default()
}

fn cases(e: &Value) -> Vec<&str> {
    e.get("variants")
        .and_then(Value::as_array)
        .map(|vs| vs.iter().map(|v| s(v, "case")).collect())
        .unwrap_or_default()
}

fn branches(e: &Value) -> Vec<&str> {
    e.get("members")
        .and_then(Value::as_array)
        .map(|ms| ms.iter().map(|m| s(m, "type")).collect())
        .unwrap_or_default()
}

fn enum_members(e: &Value) -> Vec<(&str, &Value)> {
    e.get("members")
        .and_then(Value::as_array)
        .map(|ms| ms.iter().map(|m| (s(m, "name"), m)).collect())
        .unwrap_or_default()
}

/// The baseline file inside the baseline directory.
pub const BASELINE_FILE: &str = "introspection.json";

/// What `sluice-schema-check` found.
#[derive(Debug)]
pub struct Report {
    pub findings: Vec<Finding>,
}

impl Report {
    pub fn breaking(&self) -> usize {
        self.findings
            .iter()
            .filter(|f| f.rule.is_breaking())
            .count()
    }
}

/// The `'if'` names that hold for a build on this host with no cargo features: what a daemon
/// built without features enables (`CONFIG_LINUX` on Linux).
pub fn host_config() -> Vec<String> {
    let mut config = Vec::new();
    if cfg!(target_os = "linux") {
        config.push("CONFIG_LINUX".to_string());
    }
    config
}

/// The introspection of the schema in `schema_dir`, with the `'if'` names in `config`
/// enabled (a daemon passes the names its build enabled).
pub fn current(schema_dir: &Path, config: &[String]) -> Result<Vec<Value>, String> {
    let cfg = |c: &str| config.iter().any(|x| x == c);
    let schema = crate::schema::load_dir(schema_dir, &cfg).map_err(|e| e.to_string())?;
    Ok(crate::schema::introspect(&schema))
}

/// Compares the schema in `schema_dir`, with the `'if'` names in `config` enabled, with
/// `baseline_dir/introspection.json`.
pub fn check(schema_dir: &Path, baseline_dir: &Path, config: &[String]) -> Result<Report, String> {
    let now = current(schema_dir, config)?;
    let path = baseline_dir.join(BASELINE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let old: Vec<Value> =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Report {
        findings: compare(&old, &now),
    })
}

/// Writes the current introspection as the new baseline (at release time).
pub fn update(
    schema_dir: &Path,
    baseline_dir: &Path,
    config: &[String],
) -> Result<PathBuf, String> {
    let now = current(schema_dir, config)?;
    let path = baseline_dir.join(BASELINE_FILE);
    let mut text = serde_json::to_string_pretty(&now).map_err(|e| e.to_string())?;
    text.push('\n');
    std::fs::create_dir_all(baseline_dir)
        .map_err(|e| format!("{}: {e}", baseline_dir.display()))?;
    std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests;
