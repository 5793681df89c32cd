//! Threads and connections: PARALLEL scripts really run requests at once (the GIL is
//! released while they sleep), and the `nbdkit` module answers from the caller's connection.

mod support;

use std::time::{Duration, Instant};

use sluice_block::{Errno, Flags, OpenContext};
use sluice_python::{with_conn, ConnInfo, Connection, PeerCreds};
use support::{export, kv, load, read};

/// Reads 4 KiB with two threads at once through one export; returns the wall time.
fn two_reads_at_once(args: &[sluice_block::plugins::ConfigArg]) -> Duration {
    let p = load("parallel.py", args);
    let e = export(&p);
    let start = Instant::now();
    std::thread::scope(|s| {
        for i in 0..2u64 {
            let e = &e;
            s.spawn(move || {
                let mut buf = vec![1u8; 4096];
                e.read(&mut buf, i * 4096).unwrap();
                assert!(buf.iter().all(|&b| b == 0));
            });
        }
    });
    start.elapsed()
}

#[test]
fn parallel_script_sleeping_in_nanosleep_overlaps() {
    let t = two_reads_at_once(&[kv("ms", "400"), kv("sleep", "nbdkit")]);
    assert!(t >= Duration::from_millis(400), "{t:?}");
    assert!(
        t < Duration::from_millis(700),
        "two 400 ms reads took {t:?}"
    );
}

#[test]
fn parallel_script_sleeping_in_time_sleep_overlaps() {
    let t = two_reads_at_once(&[kv("ms", "400"), kv("sleep", "time")]);
    assert!(
        t < Duration::from_millis(700),
        "two 400 ms reads took {t:?}"
    );
}

#[test]
fn serialized_script_does_not_overlap() {
    let t = two_reads_at_once(&[kv("ms", "200"), kv("model", "serialize")]);
    assert!(
        t >= Duration::from_millis(400),
        "two 200 ms reads took {t:?}"
    );
}

fn report(h: &dyn sluice_block::Handle) -> serde_json::Value {
    let bytes = read(h, 0, 4096);
    serde_json::from_str(String::from_utf8(bytes).unwrap().trim_end()).unwrap()
}

#[test]
fn module_functions_see_the_connection() {
    let p = load("api.py", &[]);
    let conn = Connection::new(ConnInfo {
        is_tls: true,
        peer_creds: Some(PeerCreds {
            pid: 4242,
            uid: 1000,
            gid: 100,
        }),
        ..ConnInfo::default()
    });
    conn.set_export_name("ignored");
    let h = with_conn(&conn, || {
        p.open(&OpenContext {
            readonly: false,
            export_name: "disk1",
            is_tls: true,
        })
    })
    .unwrap();
    let r = report(&*h);
    assert_eq!(r["export"], "disk1");
    assert_eq!(r["tls"], true);
    assert_eq!(r["pid"], 4242);
    assert_eq!(r["uid"], 1000);
    assert_eq!(r["gid"], 100);
    assert_eq!(r["size"], 1 << 20);
    assert_eq!(r["consts"], serde_json::json!([1, 2, 4, 8, 2, 1, 1, 2, 3]));
}

#[test]
fn peer_credentials_outside_unix_socket_raise() {
    let p = load("api.py", &[]);
    let h = p.open(&support::ctx("")).unwrap();
    let r = report(&*h);
    assert_eq!(r["tls"], false);
    assert_eq!(r["export"], "");
    let pid = r["pid"].as_str().unwrap();
    assert!(
        pid.contains("not connected over a Unix domain socket"),
        "{pid}"
    );
}

#[test]
fn nanosleep_ends_with_eshutdown_when_client_goes() {
    let p = load("api.py", &[]);
    let conn = Connection::new(ConnInfo::default());
    let h = with_conn(&conn, || p.open(&support::ctx(""))).unwrap();
    let closer = conn.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        closer.mark_closed();
    });
    let start = Instant::now();
    let mut buf = [0u8; 16];
    let err = h.pread(&mut buf, 4096, Flags::NONE).unwrap_err();
    t.join().unwrap();
    assert!(start.elapsed() < Duration::from_secs(10));
    assert_eq!(err.errno, Errno::ESHUTDOWN, "{err:?}");
}

#[test]
fn disconnect_is_recorded_on_the_handles_connection() {
    let p = load("api.py", &[]);
    let conn = Connection::new(ConnInfo::default());
    let h = with_conn(&conn, || p.open(&support::ctx(""))).unwrap();
    assert_eq!(conn.disconnect_requested(), None);
    h.pwrite(b"x", 0, Flags::NONE).unwrap();
    assert_eq!(conn.disconnect_requested(), Some(true));
}

/// The `calls` count thread_state.py keeps in a `threading.local` for the calling thread.
fn calls_on_this_thread(h: &dyn sluice_block::Handle) -> u32 {
    let bytes = read(h, 0, 16);
    String::from_utf8(bytes)
        .unwrap()
        .trim_end()
        .parse()
        .unwrap()
}

/// A thread keeps its Python thread state between callbacks (it is created once per thread,
/// not per request), so a `threading.local` lives as in any Python thread; another thread
/// has its own.
#[test]
fn a_thread_keeps_its_python_thread_state_between_calls() {
    let p = load("thread_state.py", &[]);
    let h = p.open(&support::ctx("")).unwrap();
    let got: Vec<u32> = (0..3).map(|_| calls_on_this_thread(&*h)).collect();
    assert_eq!(got, [1, 2, 3]);
    std::thread::scope(|s| {
        let h = &h;
        let other = s.spawn(move || [calls_on_this_thread(&**h), calls_on_this_thread(&**h)]);
        assert_eq!(other.join().unwrap(), [1, 2]);
    });
    assert_eq!(calls_on_this_thread(&*h), 4);
}
