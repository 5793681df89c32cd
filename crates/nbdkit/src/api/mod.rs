//! The server side of nbdkit's ABI: every `nbdkit_*` function a plugin may import.
//!
//! Plugins are linked with these as undefined symbols and expect the executable that
//! dlopens them to define them, so each is a `#[no_mangle] extern "C"` function here (the
//! variadic ones in `csrc/shim.c`), listed in `nbdkit.dynlist` for the linker, and referenced
//! from `symbol_addresses` so that the linker keeps them even though no Rust code calls
//! them. Behaviour and error messages follow nbdkit 1.32 (server/public.c and friends).
//!
//! Submodules: [`log`] (errors, debug, `nbdkit_set_error`), [`parse`] (numbers, sizes,
//! booleans), [`paths`] (paths, passwords, stdio), [`conn`] (connection-scoped calls,
//! interning, sleeping, shutdown), [`lists`] (extents and export lists).

use std::ffi::{c_char, c_void};

pub mod conn;
pub mod lists;
pub mod log;
pub mod parse;
pub mod paths;

// The variadic functions, defined in C. The `va_list` ones are declared with a stand-in
// parameter type: Rust only takes their addresses, never calls them.
extern "C" {
    fn nbdkit_error(fmt: *const c_char, ...);
    fn nbdkit_verror(fmt: *const c_char, args: *mut c_void);
    fn nbdkit_debug(fmt: *const c_char, ...);
    fn nbdkit_vdebug(fmt: *const c_char, args: *mut c_void);
    fn nbdkit_printf_intern(fmt: *const c_char, ...) -> *const c_char;
    fn nbdkit_vprintf_intern(fmt: *const c_char, args: *mut c_void) -> *const c_char;
}

/// The addresses of every exported `nbdkit_*` symbol (functions and data), in
/// `nbdkit.dynlist` order.
pub(crate) fn symbol_addresses() -> [*const (); 49] {
    use crate::debug_flags::*;
    [
        paths::nbdkit_absolute_path as *const (),
        lists::nbdkit_add_export as *const (),
        lists::nbdkit_add_extent as *const (),
        nbdkit_debug as *const (),
        (&nbdkit_debug_backend_controlpath as *const std::sync::atomic::AtomicI32).cast(),
        (&nbdkit_debug_backend_datapath as *const std::sync::atomic::AtomicI32).cast(),
        (&nbdkit_debug_tls_log as *const std::sync::atomic::AtomicI32).cast(),
        (&nbdkit_debug_tls_session as *const std::sync::atomic::AtomicI32).cast(),
        conn::nbdkit_disconnect as *const (),
        nbdkit_error as *const (),
        conn::nbdkit_export_name as *const (),
        lists::nbdkit_exports_count as *const (),
        lists::nbdkit_exports_free as *const (),
        lists::nbdkit_exports_new as *const (),
        lists::nbdkit_extents_count as *const (),
        lists::nbdkit_extents_free as *const (),
        lists::nbdkit_extents_new as *const (),
        lists::nbdkit_get_export as *const (),
        lists::nbdkit_get_extent as *const (),
        conn::nbdkit_is_tls as *const (),
        conn::nbdkit_nanosleep as *const (),
        parse::nbdkit_parse_bool as *const (),
        parse::nbdkit_parse_int as *const (),
        parse::nbdkit_parse_int16_t as *const (),
        parse::nbdkit_parse_int32_t as *const (),
        parse::nbdkit_parse_int64_t as *const (),
        parse::nbdkit_parse_int8_t as *const (),
        parse::nbdkit_parse_size as *const (),
        parse::nbdkit_parse_uint16_t as *const (),
        parse::nbdkit_parse_uint32_t as *const (),
        parse::nbdkit_parse_uint64_t as *const (),
        parse::nbdkit_parse_uint8_t as *const (),
        parse::nbdkit_parse_unsigned as *const (),
        conn::nbdkit_peer_gid as *const (),
        conn::nbdkit_peer_name as *const (),
        conn::nbdkit_peer_pid as *const (),
        conn::nbdkit_peer_uid as *const (),
        nbdkit_printf_intern as *const (),
        paths::nbdkit_read_password as *const (),
        paths::nbdkit_realpath as *const (),
        log::nbdkit_set_error as *const (),
        conn::nbdkit_shutdown as *const (),
        paths::nbdkit_stdio_safe as *const (),
        conn::nbdkit_strdup_intern as *const (),
        conn::nbdkit_strndup_intern as *const (),
        lists::nbdkit_use_default_export as *const (),
        nbdkit_vdebug as *const (),
        nbdkit_verror as *const (),
        nbdkit_vprintf_intern as *const (),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::{take_last_error, Frame, PluginScope, Scope};
    use std::ffi::CStr;

    #[test]
    fn dynlist_names_every_symbol() {
        let list = include_str!("../../nbdkit.dynlist");
        let names: Vec<&str> = list
            .lines()
            .map(str::trim)
            .filter_map(|l| l.strip_suffix(';'))
            .filter(|l| l.starts_with("nbdkit_"))
            .collect();
        assert_eq!(names.len(), symbol_addresses().len());
        assert!(symbol_addresses().iter().all(|p| !p.is_null()));
    }

    #[test]
    fn error_formats_and_preserves_errno() {
        let p = PluginScope::new("test".into());
        let _s = Scope::enter(Frame::for_plugin(&p));
        crate::context::set_errno(libc::ENOENT);
        // SAFETY: a valid format with matching arguments.
        unsafe { nbdkit_error(c"open %s: %m (%d)".as_ptr(), c"disk.img".as_ptr(), 7i32) };
        assert_eq!(crate::context::errno(), libc::ENOENT);
        assert_eq!(
            take_last_error().unwrap(),
            "open disk.img: No such file or directory (7)"
        );
    }

    #[test]
    fn error_long_message_is_not_truncated() {
        let p = PluginScope::new("test".into());
        let _s = Scope::enter(Frame::for_plugin(&p));
        let long = std::ffi::CString::new("y".repeat(1000)).unwrap();
        // SAFETY: a valid format with matching arguments.
        unsafe { nbdkit_error(c"%s!".as_ptr(), long.as_ptr()) };
        assert_eq!(take_last_error().unwrap().len(), 1001);
    }

    #[test]
    fn printf_intern_formats() {
        let p = PluginScope::new("test".into());
        let _s = Scope::enter(Frame::for_plugin(&p));
        // SAFETY: a valid format with matching arguments.
        let s = unsafe { nbdkit_printf_intern(c"%s-%03d".as_ptr(), c"disk".as_ptr(), 7i32) };
        // SAFETY: interned for the plugin scope, alive here.
        assert_eq!(unsafe { CStr::from_ptr(s) }.to_str().unwrap(), "disk-007");
    }
}
