//! Why a Python plugin script could not be loaded, configured or started.
//!
//! Every message starts with the script's path as the user gave it (with the line number
//! when Python knows one, `PATH:LINE:`, as compilers print it) and reads as one line after
//! the binary's `sluice: ` prefix. The full traceback, when there is one, goes to the log
//! (`tracing::error!`) once; the message carries only the exception's last line.

use std::path::PathBuf;

/// A failure of [`crate::load`] or [`crate::dump_plugin`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The command line named no script (`sluice serve python` alone).
    #[error("python: the first parameter must be the script (script=/path/to/plugin.py)")]
    NoScript,

    /// The script file could not be read.
    #[error("{}: cannot open file: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The script does not compile (`SyntaxError`, `IndentationError`...).
    #[error("{}:{line}{}: {message}", path.display(), line_suffix(*column))]
    Syntax {
        path: PathBuf,
        line: u32,
        column: Option<u32>,
        message: String,
    },

    /// Running the script's top level raised (an `import` that fails, a `raise`...).
    /// `line` is the line of the script where it happened, if the traceback passes through
    /// the script.
    #[error("{}{}: error running this script: {message}", path.display(), line_suffix(*line))]
    Run {
        path: PathBuf,
        line: Option<u32>,
        message: String,
    },

    /// One of `open`, `get_size` or `pread` is not a function of the script.
    #[error(
        "{}: the script does not define '{callback}' (nbdkit python plugins must define open, get_size and pread)",
        path.display()
    )]
    MissingCallback {
        path: PathBuf,
        callback: &'static str,
    },

    /// `API_VERSION` is not 1 or 2 (or not an integer).
    #[error(
        "{}: plugin is incompatible with this version of sluice (API_VERSION = {api_version}); this host supports API versions 1 and 2",
        path.display()
    )]
    Incompatible { path: PathBuf, api_version: String },

    /// Parameters were given but the script has no `config` function.
    #[error(
        "{}: this plugin does not need command line configuration (parameter {param:?} given)",
        path.display()
    )]
    NoConfig { path: PathBuf, param: String },

    /// A bare parameter after the script: nbdkit's python plugin has no magic config key.
    #[error(
        "{}: expecting key=value on the command line but got: {value}",
        path.display()
    )]
    BareParameter { path: PathBuf, value: String },

    /// A lifecycle function (`config`, `config_complete`, `thread_model`, `get_ready`,
    /// `after_fork`, `dump_plugin`) raised; `message` is the exception's last line.
    #[error("{}{}: {callback}: {message}", path.display(), line_suffix(*line))]
    Callback {
        path: PathBuf,
        line: Option<u32>,
        callback: &'static str,
        message: String,
    },

    /// `thread_model()` returned something that is not one of nbdkit's four models.
    #[error("{}: thread_model() returned an unknown thread model ({model})", path.display())]
    ThreadModel { path: PathBuf, model: String },

    /// The embedded interpreter itself failed (creating the `nbdkit` module...).
    #[error("python: {message}")]
    Interpreter { message: String },
}

fn line_suffix(line: Option<u32>) -> String {
    line.map(|l| format!(":{l}")).unwrap_or_default()
}
