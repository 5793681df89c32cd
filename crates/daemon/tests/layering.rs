//! The daemon crate's modules import only modules below them (see the crate doc's
//! "Layers"). This reads the sources and fails on any `crate::` or `super::` path that
//! reaches a module of the same or a higher layer, so an import circle cannot come back
//! unnoticed. Test modules (`tests.rs`, `#[cfg(test)] mod ... {}`) may use anything.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The layers, bottom first. A module may use modules of lower layers only.
const LAYERS: &[&[&str]] = &[
    &["generated"],
    &["events"],
    &["throttle"],
    &["objects"],
    &["graph"],
    &["exports"],
    &["jobs"],
    &["state"],
    &[
        "jobs::stream",
        "jobs::mirror_engine",
        "jobs::create",
        "jobs::backup",
    ],
    &["jobs::active_commit", "jobs::mirror"],
    &["jobs::commit", "jobs::drive_mirror"],
    &["jobs::commands", "transaction"],
    &["snapshot"],
    &["blockstats"],
    &["commands"],
    &["monitor"],
];

/// Module directories whose files count as one module: `graph`'s driver files implement its
/// `NodeDriver` trait and its registry opens them (a parent and the children it plugs in).
const UNITS: &[&str] = &["graph"];

/// The unit `module` belongs to.
fn unit(module: &str) -> &str {
    UNITS
        .iter()
        .find(|u| {
            module
                .strip_prefix(**u)
                .is_some_and(|r| r.starts_with("::"))
        })
        .copied()
        .unwrap_or(module)
}

/// Module path (`jobs::stream`) of every non-test source file under `src/`.
fn modules(src: &Path) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
                continue;
            }
            let rel = p.strip_prefix(src).unwrap().with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            match parts.last().map(String::as_str) {
                Some("lib") | Some("tests") => continue,
                Some("mod") => {
                    parts.pop();
                }
                _ => {}
            }
            out.insert(parts.join("::"), p);
        }
    }
    out
}

/// The source without comments and without inline test modules.
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = String::new();
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with("#[cfg(test)]") {
            // `#[cfg(test)] mod tests;` declares; `mod tests {` opens the rest of the file.
            continue;
        }
        if t.starts_with("mod tests {") {
            break;
        }
        let line = line.split("//").next().unwrap_or("");
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The longest module that `path` (`a::b::C`) names.
fn owner<'a>(path: &str, known: &'a BTreeMap<String, PathBuf>) -> Option<&'a str> {
    let parts: Vec<&str> = path.split("::").collect();
    (1..=parts.len())
        .rev()
        .map(|n| parts[..n].join("::"))
        .find_map(|p| known.get_key_value(&p).map(|(k, _)| k.as_str()))
}

/// Every module `src` refers to through `crate::` or `super::`.
fn references(module: &str, src: &str, known: &BTreeMap<String, PathBuf>) -> Vec<String> {
    let parent = module.rsplit_once("::").map(|(p, _)| p);
    let mut out = Vec::new();
    for (prefix, base) in [("crate::", None), ("super::", parent)] {
        if prefix == "super::" && base.is_none() {
            continue;
        }
        let mut rest = src;
        while let Some(i) = rest.find(prefix) {
            let after = &rest[i + prefix.len()..];
            let path: String = after
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            let path = path.trim_end_matches(':');
            let full = match base {
                Some(b) if path.is_empty() => b.to_string(),
                Some(b) => format!("{b}::{path}"),
                None => path.to_string(),
            };
            let found = owner(&full, known).or(base.filter(|b| known.contains_key(*b)));
            if let Some(m) = found {
                if unit(m) != unit(module) {
                    out.push(unit(m).to_string());
                }
            }
            rest = &after[path.len()..];
        }
    }
    // A parent naming its child module by a relative path (`stream::StreamDriver`).
    for child in known.keys() {
        let Some(name) = child
            .strip_prefix(module)
            .and_then(|r| r.strip_prefix("::"))
            .filter(|r| !r.contains("::"))
        else {
            continue;
        };
        let pat = format!("{name}::");
        let named = src.match_indices(&pat).any(|(i, _)| {
            !src[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == ':')
        });
        if named && unit(child) != unit(module) {
            out.push(child.clone());
        }
    }
    out
}

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&unit(module)))
}

#[test]
fn daemon_modules_import_only_lower_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let known = modules(&src);
    let mut problems = Vec::new();
    for (module, path) in &known {
        let Some(mine) = layer(module) else {
            problems.push(format!("{module}: not in LAYERS (add it where it belongs)"));
            continue;
        };
        for used in references(module, &code(path), &known) {
            match layer(&used) {
                Some(theirs) if theirs < mine => {}
                Some(_) => problems.push(format!("{module} imports {used}, which is not below it")),
                None => problems.push(format!("{module} imports {used}, which is not in LAYERS")),
            }
        }
    }
    problems.sort();
    problems.dedup();
    assert!(
        problems.is_empty(),
        "layering broken:\n{}",
        problems.join("\n")
    );
}

#[test]
fn layering_check_sees_an_upward_import() {
    let known: BTreeMap<String, PathBuf> = ["state", "commands", "jobs", "jobs::stream"]
        .iter()
        .map(|m| (m.to_string(), PathBuf::new()))
        .collect();
    let refs = references(
        "jobs::stream",
        "use crate::commands::Session;\nuse super::{Job, JobCtx};",
        &known,
    );
    assert_eq!(refs, vec!["commands".to_string(), "jobs".to_string()]);
    assert!(layer("commands") > layer("jobs::stream"));
    let refs = references("jobs", "let d = stream::StreamDriver::new();", &known);
    assert_eq!(refs, vec!["jobs::stream".to_string()]);
}
