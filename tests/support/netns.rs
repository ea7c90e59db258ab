//! Network namespaces for partition tests: `n` nodes, each in its own
//! network namespace, joined by a bridge and reachable from the test's own
//! (root) namespace; any node can be cut off — every packet to or from it
//! silently dropped — and healed.
//!
//! Layout of one instance, tagged `T` = `<pid>-<counter>`:
//! - namespace `dbpt-T-hub` holds bridge `br0`. The bridge is not in the
//!   root namespace so that the host's firewall never sees the traffic
//!   between nodes (with `br_netfilter` loaded and a FORWARD policy of DROP,
//!   as Docker sets it up, bridged frames in the root namespace would be
//!   filtered);
//! - namespace `dbpt-T-<i>` (i in 1..=n) is node i: `lo` up and `eth0` with
//!   `10.X.Y.i/24`, whose veth peer `n<i>` is a port of `br0`;
//! - the root namespace has veth `dbptT` with `10.X.Y.254/24`, whose peer
//!   `uplink` is a port of `br0`.
//!
//! Every neighbour entry is static (`nud permanent`), so no ARP is ever
//! needed: while node i is cut off (its bridge port down) its address still
//! resolves, and every packet simply vanishes. Peers see timeouts, never
//! "no route to host" nor a refusal — what a real partition looks like.
//!
//! Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and `ip` from iproute2; a
//! missing one fails the test with a message saying so, it never skips.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Every name this fixture creates starts with it (namespaces `dbpt-…`,
/// the root veth `dbpt…`), so leftovers of killed runs can be found.
const PREFIX: &str = "dbpt";
/// Longest interface name Linux accepts (IFNAMSIZ - 1).
const MAX_INTERFACE_NAME_CHARS: usize = 15;
/// The root namespace's address in every instance's subnet.
const ROOT_HOST: u8 = 254;
/// How long a reachability probe waits for the refusal of a closed port.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a probe of a cut-off node waits to be sure nothing answers.
const CUT_PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// A port nothing listens on in a fresh namespace: probing it gets a
/// refusal (reachable) or nothing (cut off).
const CLOSED_PORT: u16 = 1;

static NEXT_INSTANCE: AtomicU32 = AtomicU32::new(0);

/// `n` nodes in their own network namespaces; removed (namespaces, veths,
/// bridge) when dropped, panicking test or not.
pub struct Netns {
    /// `<pid>-<counter>`: unique among live processes.
    tag: String,
    /// The subnet `10.X.Y.0/24`.
    subnet: (u8, u8),
    n: usize,
    /// Namespaces created so far (dropped in reverse).
    namespaces: Vec<String>,
}

impl Netns {
    /// Creates the bridge and `n` (1..=9) node namespaces, removing
    /// leftovers of earlier killed runs first, and checks that the root
    /// namespace reaches every node. Panics with the reason if it cannot
    /// (not root, no `ip`, no namespace support).
    pub fn new(n: usize) -> Netns {
        assert!((1..=9).contains(&n), "1 to 9 nodes, not {n}");
        preflight();
        remove_stale();
        let pid = std::process::id();
        let counter = NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{pid}-{counter}");
        let subnet = free_subnet(pid, counter);
        let mut net = Netns {
            tag,
            subnet,
            n,
            namespaces: Vec::new(),
        };
        assert!(
            net.root_veth().len() <= MAX_INTERFACE_NAME_CHARS,
            "interface name {} too long",
            net.root_veth()
        );
        net.build();
        for i in 1..=n {
            net.assert_reachable(i);
        }
        net
    }

    /// The namespace of node `i` (1-based).
    pub fn namespace(&self, i: usize) -> String {
        assert!((1..=self.n).contains(&i), "no node {i}");
        format!("{PREFIX}-{}-{i}", self.tag)
    }

    fn hub(&self) -> String {
        format!("{PREFIX}-{}-hub", self.tag)
    }

    fn root_veth(&self) -> String {
        format!("{PREFIX}{}", self.tag)
    }

    /// Node `i`'s address (1-based).
    pub fn ip(&self, i: usize) -> Ipv4Addr {
        assert!((1..=self.n).contains(&i), "no node {i}");
        Ipv4Addr::new(10, self.subnet.0, self.subnet.1, i as u8)
    }

    /// The root namespace's address on the bridge.
    pub fn root_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.subnet.0, self.subnet.1, ROOT_HOST)
    }

    /// A MAC address per host number, fixed so neighbours can be static.
    fn mac(&self, host: u8) -> String {
        format!(
            "02:db:{:02x}:{:02x}:00:{host:02x}",
            self.subnet.0, self.subnet.1
        )
    }

    /// `program` run inside node `i`'s namespace (`ip netns exec` execs
    /// it: the child's PID is the program's own, so killing the child
    /// kills the program).
    pub fn command(&self, i: usize, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.namespace(i)])
            .arg(program);
        command
    }

    /// Cuts node `i` off: its bridge port goes down, so every packet to or
    /// from it is dropped (never refused). Checks that the root namespace
    /// no longer gets an answer from it.
    pub fn cut(&self, i: usize) {
        ip(&["-n", &self.hub(), "link", "set", &format!("n{i}"), "down"]);
        let addr = SocketAddr::V4(SocketAddrV4::new(self.ip(i), CLOSED_PORT));
        match TcpStream::connect_timeout(&addr, CUT_PROBE_TIMEOUT) {
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            other => panic!("node {i} still answers after the cut (probe of {addr}: {other:?})"),
        }
    }

    /// Reconnects node `i`, and checks that the root namespace reaches it.
    pub fn heal(&self, i: usize) {
        ip(&["-n", &self.hub(), "link", "set", &format!("n{i}"), "up"]);
        self.assert_reachable(i);
    }

    /// Panics unless a TCP connection from the root namespace to node `i`
    /// gets an answer (the refusal of a closed port will do).
    pub fn assert_reachable(&self, i: usize) {
        let addr = SocketAddr::V4(SocketAddrV4::new(self.ip(i), CLOSED_PORT));
        match TcpStream::connect_timeout(&addr, PROBE_TIMEOUT) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
            Err(e) => panic!(
                "the root namespace cannot reach node {i} in namespace {} at {addr}: {e}",
                self.namespace(i)
            ),
        }
    }

    fn build(&mut self) {
        let hub = self.hub();
        let root_veth = self.root_veth();
        let prefix = format!("10.{}.{}", self.subnet.0, self.subnet.1);
        self.add_namespace(&hub);
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &hub, "link", "set", "br0", "up"]);
        // Created in the root namespace with its peer in the hub: deleting
        // the hub deletes both ends.
        ip(&[
            "link",
            "add",
            &root_veth,
            "address",
            &self.mac(ROOT_HOST),
            "type",
            "veth",
            "peer",
            "name",
            "uplink",
            "netns",
            &hub,
        ]);
        ip(&["-n", &hub, "link", "set", "uplink", "master", "br0"]);
        ip(&["-n", &hub, "link", "set", "uplink", "up"]);
        ip(&[
            "addr",
            "add",
            &format!("{prefix}.{ROOT_HOST}/24"),
            "dev",
            &root_veth,
        ]);
        ip(&["link", "set", &root_veth, "up"]);
        for i in 1..=self.n {
            let ns = self.namespace(i);
            self.add_namespace(&ns);
            let port = format!("n{i}");
            ip(&[
                "-n",
                &hub,
                "link",
                "add",
                &port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "address",
                &self.mac(i as u8),
                "netns",
                &ns,
            ]);
            ip(&["-n", &hub, "link", "set", &port, "master", "br0"]);
            ip(&["-n", &hub, "link", "set", &port, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{prefix}.{i}/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        }
        // Static neighbours everywhere (see the module comment).
        let hosts: Vec<u8> = (1..=self.n as u8).chain([ROOT_HOST]).collect();
        for &from in &hosts {
            let (netns, dev) = if from == ROOT_HOST {
                (None, root_veth.clone())
            } else {
                (Some(self.namespace(from as usize)), "eth0".to_string())
            };
            for &to in hosts.iter().filter(|&&to| to != from) {
                let mut args: Vec<String> = Vec::new();
                if let Some(netns) = &netns {
                    args.extend(["-n".to_string(), netns.clone()]);
                }
                args.extend(
                    [
                        "neigh",
                        "replace",
                        &format!("{prefix}.{to}"),
                        "lladdr",
                        &self.mac(to),
                        "dev",
                        &dev,
                        "nud",
                        "permanent",
                    ]
                    .map(str::to_string),
                );
                ip(&args.iter().map(String::as_str).collect::<Vec<_>>());
            }
        }
    }

    fn add_namespace(&mut self, name: &str) {
        ip(&["netns", "add", name]);
        self.namespaces.push(name.to_string());
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the hub deletes every veth pair (each has one end there).
        // A namespace whose processes still run lives on, unreachable,
        // until they exit.
        for name in self.namespaces.iter().rev() {
            let _ = try_ip(&["netns", "del", name]);
        }
        let _ = try_ip(&["link", "del", &self.root_veth()]);
    }
}

/// Fails the test, saying why, unless it runs as root with a working `ip`.
fn preflight() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "the partition test must run as root (it creates network namespaces, veth pairs \
         and a bridge, which needs CAP_NET_ADMIN and CAP_SYS_ADMIN); it runs as uid {euid}"
    );
    match Command::new("ip").arg("-V").output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "the partition test needs `ip` from iproute2, and `ip -V` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!(
            "the partition test needs `ip` from iproute2 (scripts/setup.sh installs it): \
             cannot run `ip`: {e}"
        ),
    }
}

/// Runs `ip args...`; the error is its stderr.
fn try_ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Runs `ip args...`, panicking with its error (and what the fixture
/// needs) if it fails.
#[track_caller]
fn ip(args: &[&str]) -> String {
    try_ip(args).unwrap_or_else(|e| {
        panic!(
            "`ip {}` failed: {e}\n(the partition test needs root with CAP_NET_ADMIN and \
             CAP_SYS_ADMIN, and a kernel with network namespaces, veth and bridge support)",
            args.join(" ")
        )
    })
}

/// The PID in a name made by this fixture (`dbpt-<pid>-…` or
/// `dbpt<pid>-…`), if it is one.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let rest = rest.strip_prefix('-').unwrap_or(rest);
    let (pid, _) = rest.split_once('-')?;
    pid.parse().ok()
}

/// Whether the process that made `name` is gone (so its leftovers may go).
fn is_stale(name: &str) -> bool {
    owner_pid(name).is_some_and(|pid| {
        pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists()
    })
}

/// Removes namespaces and root veths left by killed runs of this fixture
/// (their owner process is gone), stopping the servers still running in
/// those namespaces.
fn remove_stale() {
    let namespaces = try_ip(&["netns", "list"]).unwrap_or_default();
    for name in namespaces
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| is_stale(name))
    {
        // A SIGKILLed test leaves its servers running in the namespace.
        for pid in try_ip(&["netns", "pids", name])
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            // SAFETY: plain kill(2) of a process found in our own
            // leftover namespace.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = try_ip(&["netns", "del", name]);
    }
    let links = try_ip(&["-o", "link", "show"]).unwrap_or_default();
    for name in links.lines().filter_map(|l| {
        // "7: dbpt123-0@if2: <...>"
        let name = l.split(": ").nth(1)?;
        Some(name.split('@').next().unwrap_or(name))
    }) {
        if is_stale(name) {
            let _ = try_ip(&["link", "del", name]);
        }
    }
}

/// A `10.X.Y.0/24` no address or route of the root namespace mentions,
/// starting from one derived from the pid (so concurrent runs differ).
fn free_subnet(pid: u32, counter: u32) -> (u8, u8) {
    let used = format!(
        "{}\n{}",
        try_ip(&["-4", "-o", "addr", "show"]).unwrap_or_default(),
        try_ip(&["-4", "route", "show", "table", "all"]).unwrap_or_default()
    );
    // X in 200..=249, Y in 0..=249.
    const CHOICES: u32 = 50 * 250;
    let start = (pid.wrapping_mul(31).wrapping_add(counter.wrapping_mul(7))) % CHOICES;
    (0..CHOICES)
        .map(|k| (start + k) % CHOICES)
        .map(|c| ((200 + c / 250) as u8, (c % 250) as u8))
        .find(|(x, y)| !used.contains(&format!("10.{x}.{y}.")))
        .expect("some 10.X.Y.0/24 is free")
}
