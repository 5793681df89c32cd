//! sluice's integration tests: each module drives the real `sluice` binary with real peers
//! (qemu's tools, libnbd's, nbdkit, qemu-storage-daemon, a Ceph cluster, Prometheus).
//!
//! They are one test binary, not one per file: every test binary of a release build is
//! linked with thin LTO, and fifty of them cost about six minutes of a cold CI build for
//! nothing. The harness still runs two tests at a time on two cores, as before; the
//! modules keep the names the files had, so `cargo test --release -p sluice --test
//! integration daemon_mirror::` runs what `--test daemon_mirror` used to.
//!
//! `cli.rs` stays a binary of its own: it makes its process a child subreaper (to wait for
//! daemonized servers), which would turn every other test's daemonized process into a
//! zombie of this one.

mod support;

mod daemon_active_commit;
mod daemon_backup;
mod daemon_bitmap_export;
mod daemon_bitmaps;
mod daemon_cli;
mod daemon_commit;
mod daemon_drive_mirror;
mod daemon_filter_nodes;
mod daemon_graph_cmds;
mod daemon_graph_ops;
mod daemon_images;
mod daemon_jobs;
mod daemon_jobs_compare;
mod daemon_jobs_live;
mod daemon_mirror;
mod daemon_mirror_crash;
mod daemon_python;
mod daemon_qmp_raw;
mod daemon_qsd_compare;
mod daemon_rbd;
mod daemon_rbd_overlay;
mod daemon_reopen;
mod daemon_snapshot;
mod daemon_stream_crash;
mod daemon_tls;
mod disk_faults;
mod filters_cli;
mod filters_data;
mod filters_formats;
mod image_crash;
mod image_errors;
mod image_io;
mod image_lock;
mod image_map;
mod inline_reads;
mod libnbd_corner_cases;
mod libnbd_tools;
mod limits;
mod nbdkit_compat;
mod nbdkit_plugins;
mod observe;
mod python_plugins;
mod qcow2_bitmaps;
mod qemu_clients;
mod qmp_cli;
mod raw_bitmaps;
mod raw_protocol;
mod rbd;
mod request_path;
mod serve_bitmaps;
mod soak;
mod splice_reads;
mod tls;
