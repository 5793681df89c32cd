//! nbdkit's ip filter: allow or deny clients by source address, and on Unix sockets by the
//! peer's process, user or group id.
//!
//! A client's address is checked against the `allow=` rules, then the `deny=` rules: the
//! first list that matches decides, and a client that matches neither is allowed (nbdkit
//! 1.32's rules, the same spellings: `all`/`any`, `allipv4`, `allipv6`, `allunix`,
//! `allvsock`, `A.B.C.D[/NN]`, `A:B:...[/NN]`, `pid:`, `uid:`, `gid:`, `vsock-cid:`,
//! `vsock-port:`). Connections of other address families are always allowed.
//!
//! The check runs in preconnect, before any negotiation, as nbdkit's does, so a refused
//! client never reaches the plugin (nor a log filter below this one). Preconnect has no
//! connection argument, so [`Filter::with_connection`], which the server calls around the
//! whole connection on the connection's own thread, keeps the peer in a thread-local for
//! it; a client whose address cannot be known is refused ("fail closed", as nbdkit).
//! `security:` rules (peer SELinux labels) came in nbdkit 1.36 and are refused with a message
//! saying so.

use std::cell::RefCell;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use crate::error::{BlockError, Errno, Result};
use crate::filter::{Filter, Next};
use crate::filters::{bad, each_param, over, FilterEnv, FilterSpec};
use crate::plugin::{ConnectionInfo, OpenContext, Plugin};
use crate::plugins::ConfigArg;

pub const SPEC: FilterSpec = FilterSpec {
    name: "ip",
    keys: &["allow", "deny"],
    help: "allow=addr[,addr...]     Set allow list.\n\
           deny=addr[,addr...]      Set deny list.",
    open,
};

fn open(params: &[ConfigArg], inner: Arc<dyn Plugin>, _env: &FilterEnv) -> Result<Arc<dyn Plugin>> {
    let mut filter = Ip::default();
    // As nbdkit, several allow= and deny= parameters append to their lists.
    each_param(&SPEC, params, |k, v| {
        let list = match k {
            "allow" => &mut filter.allow,
            _ => &mut filter.deny,
        };
        list.extend(parse_rules(k, v)?);
        Ok(())
    })?;
    Ok(over(filter, inner))
}

/// One allow/deny rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    Any,
    AnyV4,
    AnyV6,
    V4 { addr: u32, prefix: u32 },
    V6 { addr: u128, prefix: u32 },
    AnyUnix,
    Pid(i64),
    Uid(i64),
    Gid(i64),
    AnyVsock,
    VsockCid(i64),
    VsockPort(i64),
}

fn parse_rules(key: &str, value: &str) -> Result<Vec<Rule>> {
    value
        .split(',')
        .map(|entry| {
            if entry.is_empty() {
                return Err(bad("ip", key, "empty entry in rule list"));
            }
            parse_rule(key, entry)
        })
        .collect()
}

fn parse_rule(key: &str, v: &str) -> Result<Rule> {
    let lower = v.to_ascii_lowercase();
    match lower.as_str() {
        "all" | "any" => return Ok(Rule::Any),
        "allipv4" | "anyipv4" => return Ok(Rule::AnyV4),
        "allipv6" | "anyipv6" => return Ok(Rule::AnyV6),
        "allunix" | "anyunix" => return Ok(Rule::AnyUnix),
        "allvsock" | "anyvsock" => return Ok(Rule::AnyVsock),
        _ => {}
    }
    let id = |prefix: &str, min: i64, max: i64| -> Result<i64> {
        let n = &v[prefix.len()..];
        let id: i64 = n.trim_start().parse().map_err(|_| {
            bad(
                "ip",
                key,
                format!("{v}: could not parse number {n:?} after {prefix}"),
            )
        })?;
        if id < min || id > max {
            return Err(bad(
                "ip",
                key,
                format!("{v}: {prefix} parameter out of range"),
            ));
        }
        Ok(id)
    };
    let u32_max = i64::from(u32::MAX);
    if lower.starts_with("pid:") {
        return Ok(Rule::Pid(id("pid:", 1, i64::MAX)?));
    }
    if lower.starts_with("uid:") {
        return Ok(Rule::Uid(id("uid:", 0, i64::MAX)?));
    }
    if lower.starts_with("gid:") {
        return Ok(Rule::Gid(id("gid:", 0, i64::MAX)?));
    }
    if lower.starts_with("vsock-cid:") {
        return Ok(Rule::VsockCid(id("vsock-cid:", 0, u32_max)?));
    }
    if lower.starts_with("vsock-port:") {
        return Ok(Rule::VsockPort(id("vsock-port:", 0, u32_max)?));
    }
    if lower.starts_with("security:") || lower.starts_with("dn:") {
        return Err(bad(
            "ip",
            key,
            format!(
                "{v}: security: and dn: rules are nbdkit 1.36's; this ip filter has nbdkit \
                 1.32's rules (addresses, allunix, pid:, uid:, gid:, vsock-cid:, vsock-port:)"
            ),
        ));
    }
    if let Some((addr, prefix)) = v.split_once('/') {
        let prefix: u32 = prefix
            .parse()
            .map_err(|_| bad("ip", key, format!("{v}: cannot parse prefix length")))?;
        return match parse_addr(addr) {
            Some(Rule::V4 { addr, .. }) if prefix <= 32 => Ok(Rule::V4 { addr, prefix }),
            Some(Rule::V6 { addr, .. }) if prefix <= 128 => Ok(Rule::V6 { addr, prefix }),
            Some(Rule::V4 { .. }) => Err(bad("ip", key, format!("prefix is > 32 in {v}"))),
            Some(_) => Err(bad("ip", key, format!("prefix is > 128 in {v}"))),
            None => Err(bad(
                "ip",
                key,
                format!("cannot parse address \"{addr}\" from {v}"),
            )),
        };
    }
    parse_addr(v).ok_or_else(|| bad("ip", key, format!("don't know how to parse rule: {v}")))
}

/// An address without prefix: a rule matching that one address.
fn parse_addr(s: &str) -> Option<Rule> {
    if let Ok(a) = s.parse::<Ipv4Addr>() {
        return Some(Rule::V4 {
            addr: u32::from(a),
            prefix: 32,
        });
    }
    s.parse::<Ipv6Addr>().ok().map(|a| Rule::V6 {
        addr: u128::from(a),
        prefix: 128,
    })
}

/// A client's address, decoded from the raw `struct sockaddr` the server recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    V4(u32),
    V6(u128),
    Unix,
    Vsock { cid: u32, port: u32 },
    Other,
}

fn decode_peer(sa: &[u8]) -> Option<Peer> {
    let family = i32::from(u16::from_ne_bytes(sa.get(0..2)?.try_into().ok()?));
    let ne_u32 = |r: std::ops::Range<usize>| -> Option<u32> {
        Some(u32::from_ne_bytes(sa.get(r)?.try_into().ok()?))
    };
    Some(match family {
        libc::AF_INET => Peer::V4(u32::from_be_bytes(sa.get(4..8)?.try_into().ok()?)),
        libc::AF_INET6 => Peer::V6(u128::from_be_bytes(sa.get(8..24)?.try_into().ok()?)),
        libc::AF_UNIX => Peer::Unix,
        libc::AF_VSOCK => Peer::Vsock {
            port: ne_u32(4..8)?,
            cid: ne_u32(8..12)?,
        },
        _ => Peer::Other,
    })
}

fn matches(rule: Rule, peer: Peer, info: &ConnectionInfo) -> bool {
    let cred = |f: fn(&crate::plugin::PeerCreds) -> i64| info.peer_creds.as_ref().map(f);
    match (rule, peer) {
        (Rule::Any, _) => true,
        (Rule::AnyV4, Peer::V4(_)) | (Rule::AnyV6, Peer::V6(_)) => true,
        (Rule::AnyUnix, Peer::Unix) | (Rule::AnyVsock, Peer::Vsock { .. }) => true,
        (Rule::V4 { addr, prefix }, Peer::V4(a)) => {
            let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
            a & mask == addr & mask
        }
        (Rule::V6 { addr, prefix }, Peer::V6(a)) => {
            let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
            a & mask == addr & mask
        }
        (Rule::Pid(id), Peer::Unix) => cred(|c| i64::from(c.pid)) == Some(id),
        (Rule::Uid(id), Peer::Unix) => cred(|c| i64::from(c.uid)) == Some(id),
        (Rule::Gid(id), Peer::Unix) => cred(|c| i64::from(c.gid)) == Some(id),
        (Rule::VsockCid(id), Peer::Vsock { cid, .. }) => i64::from(cid) == id,
        (Rule::VsockPort(id), Peer::Vsock { port, .. }) => i64::from(port) == id,
        _ => false,
    }
}

#[derive(Debug, Default)]
struct Ip {
    allow: Vec<Rule>,
    deny: Vec<Rule>,
}

impl Ip {
    /// nbdkit's `check_if_allowed`: allow list first, then deny list, else allowed.
    fn allowed(&self, info: &ConnectionInfo) -> Result<bool> {
        let refuse = || {
            BlockError::new(
                Errno::EPERM,
                "ip: the client's address is unknown: connection refused",
            )
        };
        let peer = decode_peer(info.peer_addr.as_deref().ok_or_else(refuse)?).ok_or_else(refuse)?;
        if peer == Peer::Other {
            return Ok(true);
        }
        if self.allow.iter().any(|r| matches(*r, peer, info)) {
            return Ok(true);
        }
        Ok(!self.deny.iter().any(|r| matches(*r, peer, info)))
    }
}

thread_local! {
    /// The peer of the connection running on this thread (see the module doc).
    static PEER: RefCell<Option<ConnectionInfo>> = const { RefCell::new(None) };
}

impl Filter for Ip {
    type Conn = ();

    fn name(&self) -> &str {
        "ip"
    }

    fn with_connection(&self, next: &dyn Plugin, info: &ConnectionInfo, f: &mut dyn FnMut()) {
        let outer = PEER.with(|p| p.replace(Some(info.clone())));
        next.with_connection(info, f);
        PEER.with(|p| *p.borrow_mut() = outer);
    }

    fn preconnect(&self, next: &dyn Plugin, readonly: bool) -> Result<()> {
        let allowed = PEER.with(|p| match &*p.borrow() {
            Some(info) => self.allowed(info),
            None => self.allowed(&ConnectionInfo::default()),
        })?;
        if !allowed {
            return Err(BlockError::new(
                Errno::EPERM,
                "ip: client not permitted to connect because of source address restriction",
            ));
        }
        next.preconnect(readonly)
    }

    fn open(&self, next: &Arc<dyn Plugin>, ctx: &OpenContext<'_>) -> Result<((), Next)> {
        Ok(((), Next::open(next, ctx)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::PeerCreds;
    use crate::plugins::MemoryPlugin;

    fn filter(params: &[(&str, &str)]) -> Result<Arc<dyn Plugin>> {
        let params: Vec<_> = params.iter().map(|(k, v)| ConfigArg::kv(k, v)).collect();
        (SPEC.open)(
            &params,
            Arc::new(MemoryPlugin::new(4096)),
            &FilterEnv::default(),
        )
    }

    fn sockaddr_in(ip: [u8; 4]) -> Vec<u8> {
        let mut sa = vec![0u8; 16];
        sa[0..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        sa[4..8].copy_from_slice(&ip);
        sa
    }

    fn sockaddr_in6(ip: Ipv6Addr) -> Vec<u8> {
        let mut sa = vec![0u8; 28];
        sa[0..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
        sa[8..24].copy_from_slice(&ip.octets());
        sa
    }

    fn unix(uid: u32, gid: u32) -> ConnectionInfo {
        ConnectionInfo {
            peer_creds: Some(PeerCreds { pid: 42, uid, gid }),
            peer_addr: Some((libc::AF_UNIX as u16).to_ne_bytes().to_vec()),
            is_tls: false,
        }
    }

    fn tcp(addr: Vec<u8>) -> ConnectionInfo {
        ConnectionInfo {
            peer_creds: None,
            peer_addr: Some(addr),
            is_tls: false,
        }
    }

    /// What preconnect says for a client `info`, run as the server runs it.
    fn admitted(top: &Arc<dyn Plugin>, info: &ConnectionInfo) -> bool {
        let mut r = None;
        top.with_connection(info, &mut || r = Some(top.preconnect(false).is_ok()));
        r.unwrap()
    }

    #[test]
    fn allow_list_wins_over_deny_list() {
        let top = filter(&[("allow", "127.0.0.1,::1"), ("deny", "all")]).unwrap();
        assert!(admitted(&top, &tcp(sockaddr_in([127, 0, 0, 1]))));
        assert!(admitted(&top, &tcp(sockaddr_in6(Ipv6Addr::LOCALHOST))));
        assert!(!admitted(&top, &tcp(sockaddr_in([10, 0, 0, 1]))));
        assert!(!admitted(&top, &unix(0, 0)));
    }

    #[test]
    fn cidr_ranges_match_by_prefix() {
        let top = filter(&[("deny", "10.0.0.0/8,fd00::/8")]).unwrap();
        assert!(!admitted(&top, &tcp(sockaddr_in([10, 200, 3, 4]))));
        assert!(admitted(&top, &tcp(sockaddr_in([11, 0, 0, 1]))));
        assert!(!admitted(
            &top,
            &tcp(sockaddr_in6("fd12::1".parse().unwrap()))
        ));
        assert!(admitted(&top, &tcp(sockaddr_in6(Ipv6Addr::LOCALHOST))));
        let zero = filter(&[("deny", "0.0.0.0/0")]).unwrap();
        assert!(!admitted(&zero, &tcp(sockaddr_in([1, 2, 3, 4]))));
    }

    #[test]
    fn unix_peers_are_matched_by_uid_and_gid() {
        let top = filter(&[("allow", "uid:1000"), ("deny", "allunix")]).unwrap();
        assert!(admitted(&top, &unix(1000, 5)));
        assert!(!admitted(&top, &unix(1001, 5)));
        let top = filter(&[("allow", "gid:5"), ("deny", "all")]).unwrap();
        assert!(admitted(&top, &unix(1001, 5)));
        // uid: rules never match TCP clients.
        let top = filter(&[("deny", "uid:0")]).unwrap();
        assert!(admitted(&top, &tcp(sockaddr_in([127, 0, 0, 1]))));
    }

    #[test]
    fn no_rules_allow_everyone_but_an_unknown_peer_is_refused() {
        let top = filter(&[]).unwrap();
        assert!(admitted(&top, &unix(1, 1)));
        assert!(!admitted(&top, &ConnectionInfo::default()));
    }

    #[test]
    fn bad_rules_name_the_filter_the_key_and_the_rule() {
        for (key, value, says) in [
            ("allow", "garbage", "don't know how to parse rule: garbage"),
            ("deny", "10.0.0.0/33", "prefix is > 32"),
            ("allow", "127.0.0.1,,::1", "empty entry"),
            ("allow", "uid:x", "could not parse number"),
            ("allow", "pid:0", "out of range"),
            ("deny", "security:system_u", "nbdkit 1.36"),
        ] {
            let e = filter(&[(key, value)]).err().unwrap();
            assert_eq!(e.errno, Errno::EINVAL);
            assert!(e.message.starts_with(&format!("ip: {key}: ")), "{e}");
            assert!(e.message.contains(says), "{e}");
        }
    }
}
