//! nbdkit's exportname filter: what the export list says (`exportname-list=`), which export
//! "" means (`default-export=`), whether clients may ask for names not listed
//! (`exportname-strict=`), and the descriptions sent with names (`exportdesc=`).
//!
//! Descriptions from a script run it with `/bin/sh`, `$name` set to the export, and take its
//! output (at most 4096 bytes, one trailing newline dropped), as nbdkit does.

use std::io::Read;
use std::sync::Arc;

use crate::error::{BlockError, Errno, Result};
use crate::filter::{Filter, Next};
use crate::filters::{bad, each_param, over, parse_bool, FilterEnv, FilterSpec};
use crate::plugin::{ExportEntry, Handle, OpenContext, Plugin};
use crate::plugins::ConfigArg;

use super::shell_quote;

pub const SPEC: FilterSpec = FilterSpec {
    name: "exportname",
    keys: &[
        "default-export",
        "default_export",
        "exportname-list",
        "exportname_list",
        "exportname-strict",
        "exportname_strict",
        "exportname",
        "exportdesc",
    ],
    help: "default-export=<NAME>     Canonical name for the \"\" default export.\n\
           exportname-list=<MODE>    Which exports to advertise: keep (default), error,\n\
           \x20                         empty, defaultonly, explicit.\n\
           exportname-strict=<BOOL>  Limit clients to explicit exports (default false).\n\
           exportname=<NAME>         Add an explicit export name, may be repeated.\n\
           exportdesc=<MODE>         Set descriptions according to mode: keep (default),\n\
           \x20                         none, fixed:STRING, script:SCRIPT.",
    open,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ListMode {
    Keep,
    Error,
    Empty,
    DefaultOnly,
    Explicit,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum DescMode {
    Keep,
    None,
    Fixed(String),
    Script(String),
}

#[derive(Debug)]
struct ExportName {
    default_export: Option<String>,
    list: ListMode,
    strict: bool,
    exports: Vec<String>,
    desc: DescMode,
}

fn open(params: &[ConfigArg], inner: Arc<dyn Plugin>, _env: &FilterEnv) -> Result<Arc<dyn Plugin>> {
    let mut f = ExportName {
        default_export: None,
        list: ListMode::Keep,
        strict: false,
        exports: Vec::new(),
        desc: DescMode::Keep,
    };
    each_param(&SPEC, params, |k, v| {
        match k {
            "default-export" | "default_export" => {
                // The empty name is the same as not giving one.
                f.default_export = (!v.is_empty()).then(|| v.to_string());
            }
            "exportname-list" | "exportname_list" => {
                f.list = match v {
                    "keep" => ListMode::Keep,
                    "error" => ListMode::Error,
                    "empty" => ListMode::Empty,
                    "defaultonly" | "default-only" => ListMode::DefaultOnly,
                    "explicit" => ListMode::Explicit,
                    _ => {
                        return Err(bad(
                            "exportname",
                            k,
                            format!(
                                "unrecognized exportname-list mode: {v} (expected keep, \
                                 error, empty, defaultonly or explicit)"
                            ),
                        ))
                    }
                }
            }
            "exportname-strict" | "exportname_strict" => {
                f.strict = parse_bool("exportname", k, v)?;
            }
            "exportname" => f.exports.push(v.to_string()),
            _ => {
                f.desc = if v == "keep" {
                    DescMode::Keep
                } else if v == "none" {
                    DescMode::None
                } else if let Some(s) = v.strip_prefix("fixed:") {
                    DescMode::Fixed(s.to_string())
                } else if let Some(s) = v.strip_prefix("script:") {
                    DescMode::Script(s.to_string())
                } else {
                    return Err(bad(
                        "exportname",
                        k,
                        format!(
                            "unrecognized exportdesc mode: {v} (expected keep, none, \
                             fixed:STRING or script:SCRIPT)"
                        ),
                    ));
                }
            }
        }
        Ok(())
    })?;
    Ok(over(f, inner))
}

impl ExportName {
    /// The description of export `name`, given the layer below's (`keep`).
    fn describe(&self, name: &str, below: Option<String>) -> Option<String> {
        match &self.desc {
            DescMode::Keep => below,
            DescMode::None => None,
            DescMode::Fixed(s) => Some(s.clone()),
            DescMode::Script(script) => script_description(name, script),
        }
    }
}

/// Runs the `exportdesc=script:` script for `name` and returns what it printed.
fn script_description(name: &str, script: &str) -> Option<String> {
    let cmd = format!("export name; name={}\n{script}\n", shell_quote(name));
    let mut child = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(&cmd)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| tracing::debug!("exportname: cannot run the exportdesc script: {e}"))
        .ok()?;
    let mut out = Vec::new();
    let read = child
        .stdout
        .take()
        .map(|s| s.take(4096).read_to_end(&mut out));
    // Whatever the script did with the rest of its output, reap it.
    let _ = child.wait();
    if let Some(Err(e)) = read {
        tracing::debug!("exportname: reading the exportdesc script's output: {e}");
        return None;
    }
    if out.last() == Some(&b'\n') {
        out.pop();
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

impl Filter for ExportName {
    type Conn = String;

    fn name(&self) -> &str {
        "exportname"
    }

    fn default_export(&self, next: &dyn Plugin, readonly: bool, is_tls: bool) -> Result<String> {
        if self.strict {
            // Only if "" was listed explicitly may a client ask for the default export.
            if self.exports.iter().any(String::is_empty) {
                return Ok(self.default_export.clone().unwrap_or_default());
            }
            return Err(BlockError::new(
                Errno(libc::ENOENT),
                "default export (\"\") not permitted",
            ));
        }
        match &self.default_export {
            Some(name) => Ok(name.clone()),
            None => next.default_export(readonly, is_tls),
        }
    }

    fn list_exports(
        &self,
        next: &dyn Plugin,
        readonly: bool,
        is_tls: bool,
    ) -> Result<Vec<ExportEntry>> {
        let source = match self.list {
            ListMode::Keep => next.list_exports(readonly, is_tls)?,
            ListMode::Error => {
                return Err(BlockError::new(
                    Errno::EPERM,
                    "export list restricted by policy",
                ))
            }
            ListMode::Empty => return Ok(Vec::new()),
            ListMode::DefaultOnly => {
                return Ok(vec![ExportEntry {
                    name: self.default_export(next, readonly, is_tls)?,
                    description: None,
                }])
            }
            ListMode::Explicit => self
                .exports
                .iter()
                .map(|name| ExportEntry {
                    name: name.clone(),
                    description: None,
                })
                .collect(),
        };
        Ok(source
            .into_iter()
            .map(|e| ExportEntry {
                description: self.describe(&e.name, e.description),
                name: e.name,
            })
            .collect())
    }

    fn open(&self, next: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<(String, Next)> {
        if self.strict && !self.exports.iter().any(|e| e == ctx.export_name) {
            // nbdkit's message, unbalanced quote included.
            return Err(BlockError::new(
                Errno(libc::ENOENT),
                format!("export '{} not found", ctx.export_name),
            ));
        }
        Ok((ctx.export_name.to_string(), Next::open(next, ctx)?))
    }

    fn export_description(&self, name: &String, next: &Next) -> Result<Option<String>> {
        let below = match self.desc {
            DescMode::Keep => next.export_description()?,
            _ => None,
        };
        Ok(self.describe(name, below))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::MemoryPlugin;

    fn filter(params: &[(&str, &str)]) -> Result<Arc<dyn Plugin>> {
        let params: Vec<_> = params.iter().map(|(k, v)| ConfigArg::kv(k, v)).collect();
        (SPEC.open)(
            &params,
            Arc::new(MemoryPlugin::new(4096)),
            &FilterEnv::default(),
        )
    }

    fn ctx(name: &str) -> OpenContext<'_> {
        OpenContext {
            readonly: false,
            export_name: name,
            is_tls: false,
        }
    }

    fn names(list: Vec<ExportEntry>) -> Vec<(String, Option<String>)> {
        list.into_iter().map(|e| (e.name, e.description)).collect()
    }

    #[test]
    fn explicit_list_with_fixed_descriptions() {
        let top = filter(&[
            ("exportname-list", "explicit"),
            ("exportname", "a"),
            ("exportname", "b c"),
            ("exportdesc", "fixed:hello"),
        ])
        .unwrap();
        assert_eq!(
            names(top.list_exports(false, false).unwrap()),
            [
                ("a".into(), Some("hello".into())),
                ("b c".into(), Some("hello".into()))
            ]
        );
        let h = top.open(&ctx("zzz")).unwrap();
        assert_eq!(h.export_description().unwrap().as_deref(), Some("hello"));
    }

    #[test]
    fn list_modes_error_empty_and_default_only() {
        let e = filter(&[("exportname-list", "error")]).unwrap();
        assert!(e.list_exports(false, false).is_err());
        let e = filter(&[("exportname-list", "empty")]).unwrap();
        assert!(e.list_exports(false, false).unwrap().is_empty());
        let e = filter(&[("exportname-list", "defaultonly"), ("default-export", "d")]).unwrap();
        assert_eq!(
            names(e.list_exports(false, false).unwrap()),
            [("d".into(), None)]
        );
        assert_eq!(e.default_export(false, false).unwrap(), "d");
    }

    #[test]
    fn strict_refuses_unlisted_names_and_the_default_unless_listed() {
        let top = filter(&[("exportname-strict", "true"), ("exportname", "a")]).unwrap();
        top.open(&ctx("a")).unwrap();
        let e = top.open(&ctx("b")).err().unwrap();
        assert_eq!(e.errno, Errno(libc::ENOENT));
        assert!(top.default_export(false, false).is_err());
        let top = filter(&[("exportname_strict", "1"), ("exportname", "")]).unwrap();
        assert_eq!(top.default_export(false, false).unwrap(), "");
    }

    #[test]
    fn script_descriptions_see_the_name() {
        let top = filter(&[("exportdesc", "script:echo \"<$name>\"")]).unwrap();
        let h = top.open(&ctx("x y")).unwrap();
        assert_eq!(h.export_description().unwrap().as_deref(), Some("<x y>"));
    }

    #[test]
    fn bad_modes_name_filter_and_key() {
        for (k, v) in [
            ("exportname-list", "some"),
            ("exportdesc", "maybe"),
            ("exportname-strict", "perhaps"),
        ] {
            let e = filter(&[(k, v)]).err().unwrap();
            assert!(e.message.starts_with(&format!("exportname: {k}: ")), "{e}");
        }
    }
}
