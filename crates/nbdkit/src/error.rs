//! Why an nbdkit plugin could not be loaded, configured or started.
//!
//! Every message starts with the plugin's path as the user gave it and reads as one line
//! after the binary's `sluice: ` prefix, like nbdkit's own startup errors (whose wording is
//! kept where sluice does the same thing, so search results for nbdkit's messages apply).

use std::path::PathBuf;

/// A failure of [`crate::load`] or [`crate::dump_plugin`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// dlopen failed (missing file, missing library, unresolved symbol).
    #[error("{}: cannot open plugin: {reason}", path.display())]
    Open { path: PathBuf, reason: String },

    /// The library has no `plugin_init` (not an nbdkit plugin, or a filter).
    #[error("{}: not an nbdkit plugin: {reason}", path.display())]
    NoInit { path: PathBuf, reason: String },

    /// `plugin_init()` returned NULL.
    #[error("{}: plugin registration function failed", path.display())]
    InitFailed { path: PathBuf },

    /// `_api_version` is not 1 or 2.
    #[error(
        "{}: plugin is incompatible with this version of sluice (_api_version = {api_version})",
        path.display()
    )]
    Incompatible { path: PathBuf, api_version: i32 },

    /// A required callback (`open`, `get_size`, `pread`) is NULL.
    #[error("{}: plugin must have a .{callback} callback", path.display())]
    MissingCallback {
        path: PathBuf,
        callback: &'static str,
    },

    /// `.name` is NULL, empty or has characters nbdkit forbids.
    #[error("{}: {problem}", path.display())]
    BadName { path: PathBuf, problem: String },

    /// The plugin has no `config` callback but parameters were given.
    #[error(
        "{}: this plugin does not need command line configuration (parameter {param:?} given)",
        path.display()
    )]
    NoConfig { path: PathBuf, param: String },

    /// A bare parameter after the first, for a plugin with no `magic_config_key`.
    #[error(
        "{}: expecting key=value on the command line but got: {value}",
        path.display()
    )]
    BareParameter { path: PathBuf, value: String },

    /// A parameter or debug flag that C cannot receive.
    #[error("{}: {what} contains a NUL byte", path.display())]
    Nul { path: PathBuf, what: String },

    /// A lifecycle callback (`config`, `config_complete`, `thread_model`, `get_ready`,
    /// `after_fork`) failed; `message` is the plugin's `nbdkit_error`.
    #[error("{}: {callback}: {message}", path.display())]
    Callback {
        path: PathBuf,
        callback: &'static str,
        message: String,
    },

    /// `_thread_model` or `thread_model()` is not one of nbdkit's four models.
    #[error("{}: plugin declares an unknown thread model ({model})", path.display())]
    ThreadModel { path: PathBuf, model: i32 },

    /// `-D NAME.FLAG=N` names a variable the plugin does not have.
    #[error("{}: -D {name}.{flag}: plugin does not contain a global variable called {symbol}", path.display())]
    DebugFlag {
        path: PathBuf,
        name: String,
        flag: String,
        symbol: String,
    },

    /// Capturing the plugin's `dump_plugin` output failed.
    #[error("{}: --dump-plugin: {source}", path.display())]
    Dump {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
