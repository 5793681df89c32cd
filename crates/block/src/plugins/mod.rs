//! The built-in plugins and the registry that configures them from command-line parameters.
//!
//! Each plugin lives in its own file and mirrors the nbdkit plugin of the same name
//! (parameters, capabilities, behaviour), so that `nbdkit memory 1G` becomes
//! `sluice serve memory 1G`. The registry here is the one place that maps a name and a list
//! of `key=value` parameters to a configured [`Plugin`]: it resolves bare values to the
//! plugin's magic config key, as nbdkit does, and reports configuration mistakes as
//! [`ConfigError`]s, one line each, naming the plugin and the offending parameter.
//! Configuration is checked up front (sizes parsed, files found) so that a bad command line
//! fails at startup rather than at the first client.

use std::sync::Arc;

use crate::plugin::Plugin;
use crate::size::SizeError;

pub mod file;
pub mod memory;
pub mod null;
pub mod pattern;

pub use file::FilePlugin;
pub use memory::MemoryPlugin;
pub use null::NullPlugin;
pub use pattern::PatternPlugin;

/// One command-line parameter: `key=value`, or a bare value (key None) which the plugin maps
/// to its magic config key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigArg {
    pub key: Option<String>,
    pub value: String,
}

impl ConfigArg {
    /// Splits a command-line word the way nbdkit does: at the first `=` if what precedes it
    /// looks like a key (a letter, then letters, digits, `.`, `_`, `-`), else the whole word
    /// is a bare value (so `./a=b` and `/x=y` stay paths).
    pub fn parse(word: &str) -> ConfigArg {
        match word.split_once('=') {
            Some((key, value)) if is_config_key(key) => ConfigArg {
                key: Some(key.to_owned()),
                value: value.to_owned(),
            },
            _ => ConfigArg {
                key: None,
                value: word.to_owned(),
            },
        }
    }

    /// A `key=value` parameter.
    pub fn kv(key: &str, value: &str) -> ConfigArg {
        ConfigArg {
            key: Some(key.to_owned()),
            value: value.to_owned(),
        }
    }

    /// A bare value, for the plugin's magic config key.
    pub fn bare(value: &str) -> ConfigArg {
        ConfigArg {
            key: None,
            value: value.to_owned(),
        }
    }
}

/// nbdkit's `is_config_key`: a letter, then letters, digits, `.`, `_`, `-`.
fn is_config_key(key: &str) -> bool {
    let mut chars = key.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// A plugin's command-line parameters could not be accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("{plugin}: unknown parameter '{key}' (see `--help` for this plugin's parameters)")]
    UnknownParameter { plugin: &'static str, key: String },

    #[error("{plugin}: you must specify {what} on the command line")]
    MissingParameter {
        plugin: &'static str,
        what: &'static str,
    },

    #[error("{plugin}: {key}={value}: {reason}")]
    BadSize {
        plugin: &'static str,
        key: &'static str,
        value: String,
        reason: SizeError,
    },

    #[error("{plugin}: unknown {key} '{value}' (expected {expected})")]
    BadValue {
        plugin: &'static str,
        key: &'static str,
        value: String,
        expected: &'static str,
    },

    #[error("{plugin}: {path}: {reason}")]
    FileNotFound {
        plugin: &'static str,
        path: String,
        reason: std::io::Error,
    },

    #[error("{plugin}: {path}: {problem}")]
    BadFile {
        plugin: &'static str,
        path: String,
        problem: &'static str,
    },

    #[error("{plugin}: {message}")]
    Invalid {
        plugin: &'static str,
        message: &'static str,
    },
}

/// Names of the built-in plugins.
pub fn builtin_names() -> &'static [&'static str] {
    &["memory", "file", "null", "pattern"]
}

/// Configures the built-in plugin `name` from `args`. None if `name` is not a built-in plugin.
pub fn open_builtin(
    name: &str,
    args: &[ConfigArg],
) -> Option<Result<Arc<dyn Plugin>, ConfigError>> {
    fn erase<P: Plugin>(r: Result<P, ConfigError>) -> Result<Arc<dyn Plugin>, ConfigError> {
        r.map(|p| Arc::new(p) as Arc<dyn Plugin>)
    }
    Some(match name {
        "memory" => erase(MemoryPlugin::from_args(args)),
        "file" => erase(FilePlugin::from_args(args)),
        "null" => erase(NullPlugin::from_args(args)),
        "pattern" => erase(PatternPlugin::from_args(args)),
        _ => return None,
    })
}

/// The plugin's magic config key: the key a bare value on the command line stands for.
pub fn builtin_magic_key(name: &str) -> Option<&'static str> {
    Some(match name {
        "memory" => memory::MAGIC_KEY,
        "file" => file::MAGIC_KEY,
        "null" => null::MAGIC_KEY,
        "pattern" => pattern::MAGIC_KEY,
        _ => return None,
    })
}

/// The plugin's parameter help for `--help` (like nbdkit's `config_help`).
pub fn builtin_help(name: &str) -> Option<&'static str> {
    Some(match name {
        "memory" => memory::HELP,
        "file" => file::HELP,
        "null" => null::HELP,
        "pattern" => pattern::HELP,
        _ => return None,
    })
}

/// Walks `args` as (key, value) pairs, bare values taking `magic`, and hands each to `apply`.
pub(crate) fn for_each_arg<'a>(
    args: &'a [ConfigArg],
    magic: &'static str,
    mut apply: impl FnMut(&'a str, &'a str) -> Result<(), ConfigError>,
) -> Result<(), ConfigError> {
    for arg in args {
        apply(arg.key.as_deref().unwrap_or(magic), &arg.value)?;
    }
    Ok(())
}

/// Parses `value` as a size for parameter `key` of `plugin`.
pub(crate) fn size_arg(
    plugin: &'static str,
    key: &'static str,
    value: &str,
) -> Result<u64, ConfigError> {
    crate::size::parse_size(value).map_err(|reason| ConfigError::BadSize {
        plugin,
        key,
        value: value.to_owned(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_arg_parse_splits_keys_but_not_paths() {
        assert_eq!(ConfigArg::parse("size=1G"), ConfigArg::kv("size", "1G"));
        assert_eq!(ConfigArg::parse("1G"), ConfigArg::bare("1G"));
        assert_eq!(ConfigArg::parse("./a=b"), ConfigArg::bare("./a=b"));
        assert_eq!(ConfigArg::parse("/x/y=z"), ConfigArg::bare("/x/y=z"));
        assert_eq!(ConfigArg::parse("=x"), ConfigArg::bare("=x"));
        assert_eq!(ConfigArg::parse("1a=c"), ConfigArg::bare("1a=c"));
        assert_eq!(ConfigArg::parse("a.b=c"), ConfigArg::kv("a.b", "c"));
        assert_eq!(ConfigArg::parse("a-b_c=1=2"), ConfigArg::kv("a-b_c", "1=2"));
    }

    #[test]
    fn open_builtin_unknown_name_is_none() {
        assert!(open_builtin("nope", &[]).is_none());
        assert!(builtin_help("nope").is_none());
        assert!(builtin_magic_key("nope").is_none());
    }

    #[test]
    fn open_builtin_every_name_has_help_and_magic_key() {
        for name in builtin_names() {
            assert!(builtin_help(name).is_some(), "{name}");
            assert!(builtin_magic_key(name).is_some(), "{name}");
        }
    }

    #[test]
    fn open_builtin_bare_value_goes_to_magic_key() {
        let p = open_builtin("null", &[ConfigArg::bare("1M")])
            .unwrap()
            .unwrap();
        assert_eq!(p.name(), "null");
        let h = p
            .open(&crate::plugin::OpenContext {
                readonly: false,
                export_name: "",
                is_tls: false,
            })
            .unwrap();
        assert_eq!(h.get_size().unwrap(), 1 << 20);
    }

    #[test]
    fn open_builtin_unknown_parameter_is_error() {
        let err = open_builtin("memory", &[ConfigArg::kv("foo", "1")])
            .unwrap()
            .err()
            .unwrap();
        assert!(matches!(err, ConfigError::UnknownParameter { .. }));
        assert!(
            err.to_string().contains("memory: unknown parameter 'foo'"),
            "{err}"
        );
    }

    #[test]
    fn open_builtin_bad_size_names_plugin_and_parameter() {
        let err = open_builtin("pattern", &[ConfigArg::bare("1Q")])
            .unwrap()
            .err()
            .unwrap();
        assert_eq!(
            err.to_string(),
            "pattern: size=1Q: could not parse size: unknown suffix 'Q'"
        );
    }
}
