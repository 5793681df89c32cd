//! `struct nbdkit_extents` and `struct nbdkit_exports`: the lists plugins fill in.
//!
//! `struct nbdkit_extents *` is a pointer to [`sluice_block::Extents`], so a plugin's
//! `nbdkit_add_extent` calls go straight into the block layer's implementation of nbdkit's
//! rules (ordering, clipping, coalescing) with no copy. `struct nbdkit_exports *` is a
//! pointer to `ExportList`. Both may also be created by `nbdkit_*_new` (filter API that
//! plugins link against through nbdkit's cleanup helpers), which box them.

use std::ffi::{c_char, c_int, CStr, CString};

use sluice_block::Extents;

use crate::abi::{NbdkitExport, NbdkitExportsOpaque, NbdkitExtent, NbdkitExtentsOpaque};
use crate::api::log::report_error;
use crate::context;

/// nbdkit's cap on an export list.
const MAX_EXPORTS: usize = 10_000;
/// NBD_MAX_STRING: longest export name or description.
const MAX_STRING: usize = 4096;

/// `int nbdkit_add_extent (struct nbdkit_extents *, uint64_t offset, uint64_t length,
/// uint32_t type)`.
///
/// # Safety
/// `exts` was handed to the plugin by the host for this call or made by `nbdkit_extents_new`.
#[no_mangle]
pub unsafe extern "C" fn nbdkit_add_extent(
    exts: *mut NbdkitExtentsOpaque,
    offset: u64,
    length: u64,
    r#type: u32,
) -> c_int {
    if exts.is_null() {
        report_error("nbdkit_add_extent: NULL extents list".into());
        context::set_errno(libc::EINVAL);
        return -1;
    }
    // SAFETY: per the contract the pointer is a live `Extents` that nothing else borrows
    // during the plugin callback.
    let exts = unsafe { &mut *exts.cast::<Extents>() };
    match exts.add(offset, length, r#type) {
        Ok(()) => 0,
        Err(e) => {
            report_error(format!("nbdkit_{}", e.message));
            context::set_errno(e.errno.0);
            -1
        }
    }
}

/// `struct nbdkit_extents *nbdkit_extents_new (uint64_t start, uint64_t end)`.
#[no_mangle]
pub extern "C" fn nbdkit_extents_new(start: u64, end: u64) -> *mut NbdkitExtentsOpaque {
    if start > i64::MAX as u64 || end > i64::MAX as u64 {
        report_error(format!(
            "nbdkit_extents_new: start ({start}) or end ({end}) > INT64_MAX"
        ));
        context::set_errno(libc::ERANGE);
        return std::ptr::null_mut();
    }
    if start > end {
        report_error(format!(
            "nbdkit_extents_new: start ({start}) >= end ({end})"
        ));
        context::set_errno(libc::ERANGE);
        return std::ptr::null_mut();
    }
    Box::into_raw(Box::new(Extents::new(start, end))).cast()
}

/// `void nbdkit_extents_free (struct nbdkit_extents *)`.
///
/// # Safety
/// `exts` is NULL or came from `nbdkit_extents_new` and is not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn nbdkit_extents_free(exts: *mut NbdkitExtentsOpaque) {
    if !exts.is_null() {
        // SAFETY: allocated by Box in `nbdkit_extents_new`, per the contract.
        drop(unsafe { Box::from_raw(exts.cast::<Extents>()) });
    }
}

/// `size_t nbdkit_extents_count (const struct nbdkit_extents *)`.
///
/// # Safety
/// `exts` is a live extents list.
#[no_mangle]
pub unsafe extern "C" fn nbdkit_extents_count(exts: *const NbdkitExtentsOpaque) -> usize {
    if exts.is_null() {
        return 0;
    }
    // SAFETY: a live `Extents` per the contract.
    unsafe { &*exts.cast::<Extents>() }.as_slice().len()
}

/// `struct nbdkit_extent nbdkit_get_extent (const struct nbdkit_extents *, size_t)`.
///
/// # Safety
/// `exts` is a live extents list.
#[no_mangle]
pub unsafe extern "C" fn nbdkit_get_extent(
    exts: *const NbdkitExtentsOpaque,
    i: usize,
) -> NbdkitExtent {
    let none = NbdkitExtent {
        offset: 0,
        length: 0,
        r#type: 0,
    };
    if exts.is_null() {
        return none;
    }
    // SAFETY: a live `Extents` per the contract.
    match unsafe { &*exts.cast::<Extents>() }.as_slice().get(i) {
        Some(e) => NbdkitExtent {
            offset: e.offset,
            length: e.length,
            r#type: e.kind,
        },
        None => {
            report_error(format!("nbdkit_get_extent: index {i} out of range"));
            none
        }
    }
}

/// The list behind `struct nbdkit_exports *`.
#[derive(Debug, Default)]
pub(crate) struct ExportList {
    pub(crate) entries: Vec<(CString, Option<CString>)>,
    /// `nbdkit_use_default_export` was called: append the default export's name.
    pub(crate) use_default: bool,
}

impl ExportList {
    pub(crate) fn as_opaque(&mut self) -> *mut NbdkitExportsOpaque {
        (self as *mut ExportList).cast()
    }
}

/// # Safety
/// `exps` is a live `ExportList` not otherwise borrowed.
unsafe fn exports_mut<'a>(exps: *mut NbdkitExportsOpaque) -> Option<&'a mut ExportList> {
    if exps.is_null() {
        report_error("NULL export list".into());
        context::set_errno(libc::EINVAL);
        None
    } else {
        // SAFETY: per the contract.
        Some(unsafe { &mut *exps.cast::<ExportList>() })
    }
}

/// `int nbdkit_add_export (struct nbdkit_exports *, const char *name,
/// const char *description)`.
///
/// # Safety
/// `exps` is a live list; `name` a C string; `description` NULL or a C string.
#[no_mangle]
pub unsafe extern "C" fn nbdkit_add_export(
    exps: *mut NbdkitExportsOpaque,
    name: *const c_char,
    description: *const c_char,
) -> c_int {
    // SAFETY: forwarded contract.
    let Some(list) = (unsafe { exports_mut(exps) }) else {
        return -1;
    };
    if name.is_null() {
        report_error("nbdkit_add_export: NULL name".into());
        context::set_errno(libc::EINVAL);
        return -1;
    }
    if list.entries.len() >= MAX_EXPORTS {
        report_error("nbdkit_add_export: too many exports".into());
        context::set_errno(libc::EINVAL);
        return -1;
    }
    // SAFETY: a C string per the contract (checked non-NULL above).
    let name = unsafe { CStr::from_ptr(name) }.to_owned();
    let description = (!description.is_null()).then(|| {
        // SAFETY: a C string per the contract (checked non-NULL).
        unsafe { CStr::from_ptr(description) }.to_owned()
    });
    if name.as_bytes().len() > MAX_STRING
        || description
            .as_ref()
            .is_some_and(|d| d.as_bytes().len() > MAX_STRING)
    {
        report_error("nbdkit_add_export: string too long".into());
        context::set_errno(libc::EINVAL);
        return -1;
    }
    list.entries.push((name, description));
    0
}

/// `int nbdkit_use_default_export (struct nbdkit_exports *)`.
///
/// # Safety
/// `exps` is a live list.
#[no_mangle]
pub unsafe extern "C" fn nbdkit_use_default_export(exps: *mut NbdkitExportsOpaque) -> c_int {
    // SAFETY: forwarded contract.
    match unsafe { exports_mut(exps) } {
        Some(list) => {
            list.use_default = true;
            0
        }
        None => -1,
    }
}

/// `struct nbdkit_exports *nbdkit_exports_new (void)`.
#[no_mangle]
pub extern "C" fn nbdkit_exports_new() -> *mut NbdkitExportsOpaque {
    Box::into_raw(Box::<ExportList>::default()).cast()
}

/// `void nbdkit_exports_free (struct nbdkit_exports *)`.
///
/// # Safety
/// `exps` is NULL or came from `nbdkit_exports_new` and is not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn nbdkit_exports_free(exps: *mut NbdkitExportsOpaque) {
    if !exps.is_null() {
        // SAFETY: allocated by Box in `nbdkit_exports_new`, per the contract.
        drop(unsafe { Box::from_raw(exps.cast::<ExportList>()) });
    }
}

/// `size_t nbdkit_exports_count (const struct nbdkit_exports *)`.
///
/// # Safety
/// `exps` is a live list.
#[no_mangle]
pub unsafe extern "C" fn nbdkit_exports_count(exps: *const NbdkitExportsOpaque) -> usize {
    if exps.is_null() {
        return 0;
    }
    // SAFETY: per the contract.
    unsafe { &*exps.cast::<ExportList>() }.entries.len()
}

/// `const struct nbdkit_export nbdkit_get_export (const struct nbdkit_exports *, size_t)`.
/// The strings belong to the list.
///
/// # Safety
/// `exps` is a live list.
#[no_mangle]
pub unsafe extern "C" fn nbdkit_get_export(
    exps: *const NbdkitExportsOpaque,
    i: usize,
) -> NbdkitExport {
    let none = NbdkitExport {
        name: std::ptr::null_mut(),
        description: std::ptr::null_mut(),
    };
    if exps.is_null() {
        return none;
    }
    // SAFETY: per the contract.
    match unsafe { &*exps.cast::<ExportList>() }.entries.get(i) {
        Some((name, desc)) => NbdkitExport {
            name: name.as_ptr().cast_mut(),
            description: desc
                .as_ref()
                .map_or(std::ptr::null_mut(), |d| d.as_ptr().cast_mut()),
        },
        None => {
            report_error(format!("nbdkit_get_export: index {i} out of range"));
            none
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_block::Extent;

    #[test]
    fn add_extent_coalesces_through_c_api() {
        let e = nbdkit_extents_new(0, 100);
        // SAFETY: `e` is a live list from nbdkit_extents_new, freed at the end.
        unsafe {
            assert_eq!(nbdkit_add_extent(e, 0, 10, 0), 0);
            assert_eq!(nbdkit_add_extent(e, 10, 10, 0), 0);
            assert_eq!(nbdkit_add_extent(e, 20, 80, 3), 0);
            assert_eq!(nbdkit_extents_count(e), 2);
            let x = nbdkit_get_extent(e, 0);
            assert_eq!((x.offset, x.length, x.r#type), (0, 20, 0));
            let x = nbdkit_get_extent(e, 1);
            assert_eq!((x.offset, x.length, x.r#type), (20, 80, 3));
            nbdkit_extents_free(e);
        }
    }

    #[test]
    fn add_extent_out_of_order_sets_erange_and_message() {
        let plugin = context::PluginScope::new("test".into());
        let _s = context::Scope::enter(context::Frame::for_plugin(&plugin));
        let mut ext = Extents::new(0, 100);
        let p = (&mut ext as *mut Extents).cast::<NbdkitExtentsOpaque>();
        // SAFETY: `ext` is alive and not otherwise borrowed during these calls.
        unsafe {
            assert_eq!(nbdkit_add_extent(p, 0, 10, 0), 0);
            assert_eq!(nbdkit_add_extent(p, 50, 10, 0), -1);
        }
        assert_eq!(context::errno(), libc::ERANGE);
        assert!(context::take_last_error()
            .unwrap()
            .starts_with("nbdkit_add_extent: extents must be added in ascending order"));
        assert_eq!(
            ext.as_slice(),
            &[Extent {
                offset: 0,
                length: 10,
                kind: 0
            }]
        );
    }

    #[test]
    fn extents_new_rejects_bad_range() {
        assert!(nbdkit_extents_new(10, 5).is_null());
        assert!(nbdkit_extents_new(0, u64::MAX).is_null());
    }

    #[test]
    fn exports_list_round_trip() {
        let l = nbdkit_exports_new();
        // SAFETY: `l` is a live list from nbdkit_exports_new, freed at the end.
        unsafe {
            assert_eq!(nbdkit_add_export(l, c"a".as_ptr(), std::ptr::null()), 0);
            assert_eq!(nbdkit_add_export(l, c"b".as_ptr(), c"bee".as_ptr()), 0);
            assert_eq!(nbdkit_use_default_export(l), 0);
            assert_eq!(nbdkit_exports_count(l), 2);
            let e = nbdkit_get_export(l, 1);
            assert_eq!(CStr::from_ptr(e.name).to_str().unwrap(), "b");
            assert_eq!(CStr::from_ptr(e.description).to_str().unwrap(), "bee");
            assert!(nbdkit_get_export(l, 0).description.is_null());
            assert!((*l.cast::<ExportList>()).use_default);
            nbdkit_exports_free(l);
        }
    }

    #[test]
    fn add_export_too_long_is_error() {
        let plugin = context::PluginScope::new("test".into());
        let _s = context::Scope::enter(context::Frame::for_plugin(&plugin));
        let mut list = ExportList::default();
        let long = CString::new(vec![b'x'; MAX_STRING + 1]).unwrap();
        // SAFETY: a live list and valid C strings.
        let r = unsafe { nbdkit_add_export(list.as_opaque(), long.as_ptr(), std::ptr::null()) };
        assert_eq!(r, -1);
        assert_eq!(
            context::take_last_error().unwrap(),
            "nbdkit_add_export: string too long"
        );
    }
}
