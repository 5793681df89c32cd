//! The tls-fallback filter (nbdkit-tls-fallback-filter): under `--tls=on`, a client that did
//! not negotiate TLS never reaches the plugin. It gets one read-only export of 512 bytes
//! holding a message (`tlsreadme=`, default "This NBD server requires TLS authentication
//! before it will serve useful data.\n", cut or NUL-padded to 512 bytes), whatever export name
//! it asked for; a TLS client passes through untouched.
//!
//! The plaintext connection is served by a small [`Handle`] of its own, put in the
//! connection's [`Next`] with [`Next::from_handle`] instead of a handle of the layer below: the
//! layer below is never opened for it (nbdkit's reason for the filter: a plaintext client
//! must not make the plugin do work), and every method the filter does not override reaches
//! the fallback handle, so no method can leak through to the plugin by being forgotten.
//! The export list and default export are answered here for plaintext clients too (only "").
//!
//! As in nbdkit, a stack whose thread model serializes connections is refused: one plaintext
//! client holding its connection would lock out every authenticated one.

use std::sync::Arc;

use crate::error::{BlockError, Errno, Result};
use crate::filter::{Filter, Next};
use crate::plugin::{ExportEntry, Flags, Handle, OpenContext, Plugin, ThreadModel};
use crate::plugins::ConfigArg;

use super::{each_param, over, FilterEnv, FilterSpec};

pub const SPEC: FilterSpec = FilterSpec {
    name: "tls-fallback",
    keys: &["tlsreadme"],
    help: "tlsreadme=<MESSAGE>  Alternative contents for the plaintext dummy export.",
    open,
};

/// The size of the export a plaintext client sees.
const SIZE: usize = 512;
/// nbdkit's default message.
const README: &str =
    "This NBD server requires TLS authentication before it will serve useful data.\n";

fn open(params: &[ConfigArg], inner: Arc<dyn Plugin>, _: &FilterEnv) -> Result<Arc<dyn Plugin>> {
    let mut readme = README.as_bytes().to_vec();
    each_param(&SPEC, params, |_, v| {
        readme = v.as_bytes().to_vec();
        Ok(())
    })?;
    if inner.thread_model() == ThreadModel::SerializeConnections {
        return Err(BlockError::new(
            Errno::EINVAL,
            "tls-fallback: the tls-fallback filter requires parallel connection support",
        ));
    }
    readme.resize(SIZE, 0);
    Ok(over(
        TlsFallback {
            readme: readme.into(),
        },
        inner,
    ))
}

pub struct TlsFallback {
    /// The plaintext export's bytes, exactly [`SIZE`] long.
    readme: Arc<[u8]>,
}

impl Filter for TlsFallback {
    type Conn = ();

    fn name(&self) -> &str {
        "tls-fallback"
    }

    fn default_export(&self, next: &dyn Plugin, readonly: bool, is_tls: bool) -> Result<String> {
        if is_tls {
            next.default_export(readonly, is_tls)
        } else {
            Ok(String::new())
        }
    }

    fn list_exports(
        &self,
        next: &dyn Plugin,
        readonly: bool,
        is_tls: bool,
    ) -> Result<Vec<ExportEntry>> {
        if is_tls {
            next.list_exports(readonly, is_tls)
        } else {
            Ok(vec![ExportEntry {
                name: String::new(),
                description: None,
            }])
        }
    }

    fn open(&self, next: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<((), Next)> {
        if ctx.is_tls {
            return Ok(((), Next::open(next, ctx)?));
        }
        let readme = Readme(self.readme.clone());
        Ok(((), Next::from_handle(next, Arc::new(readme))))
    }
}

/// What a plaintext client is served: the message, read-only, no other capability.
struct Readme(Arc<[u8]>);

impl Handle for Readme {
    fn get_size(&self) -> Result<u64> {
        Ok(self.0.len() as u64)
    }
    fn can_zero(&self) -> Result<crate::plugin::Support> {
        Ok(crate::plugin::Support::None)
    }
    fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        let start = usize::try_from(offset).map_err(|_| BlockError::errno(Errno::EINVAL))?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.0.get(start..end))
            .ok_or_else(|| BlockError::errno(Errno::EINVAL))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;
    use crate::export::{Backend, Export};

    fn open_as(top: Arc<dyn Plugin>, is_tls: bool) -> Export {
        let ctx = OpenContext {
            readonly: false,
            export_name: "secret",
            is_tls,
        };
        Export::open(&Backend::new(top), &ctx).unwrap()
    }

    #[test]
    fn plaintext_client_gets_the_readme_and_never_the_plugin() {
        let top = filter("tls-fallback", &[], memory(1 << 20));
        let e = open_as(top.clone(), false);
        assert_eq!(e.size(), 512);
        assert!(!e.caps().writable && !e.caps().flush && !e.caps().extents);
        let mut buf = vec![1u8; 512];
        e.read(&mut buf, 0).unwrap();
        assert_eq!(&buf[..README.len()], README.as_bytes());
        assert!(buf[README.len()..].iter().all(|b| *b == 0));
        assert_eq!(top.list_exports(false, false).unwrap().len(), 1);
        assert_eq!(top.default_export(false, false).unwrap(), "");
    }

    #[test]
    fn tls_client_reaches_the_plugin() {
        let top = filter("tls-fallback", &[("tlsreadme", "hi")], memory(1 << 20));
        let e = open_as(top, true);
        assert_eq!(e.size(), 1 << 20);
        assert!(e.caps().writable);
    }

    #[test]
    fn long_readme_is_cut_to_512_bytes() {
        let long = "y".repeat(600);
        let top = filter("tls-fallback", &[("tlsreadme", &long)], memory(1 << 20));
        let e = open_as(top, false);
        let mut buf = vec![0u8; 512];
        e.read(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|b| *b == b'y'));
    }

    #[test]
    fn serialized_connections_are_refused() {
        let below = filter(
            "noparallel",
            &[("serialize", "connections")],
            memory(1 << 20),
        );
        let err = try_filter("tls-fallback", &[], below).err().unwrap();
        assert!(err.message.contains("requires parallel connection support"));
    }
}
