//! Test hosts on one machine: network namespaces on a private bridge, and the faults
//! a real network has (a partition, a refused port, a pulled cable, a slow link).
//!
//! Layout: one namespace holds only a bridge `br0`; every host is a namespace of its
//! own whose `eth0` (10.77.0.N/24) is one end of a veth pair, the other end being a
//! port of the bridge. The addresses exist only inside these namespaces, so a test
//! can reach nothing but the hosts it made. Faults are applied where a real network
//! would have them: nft rules in a host's own table, the bridge port taken down
//! (cable pulled), a `tbf` qdisc on the link (bandwidth; the kernel here has no
//! `netem`, so there is no delay or loss emulation). Everything is removed on drop,
//! also when the test panics.
//!
//! Needs root and `ip`/`nft`/`tc` (iproute2, nftables). Tests that use it are
//! `#[ignore]`d; `make unit` runs them when it can create a namespace.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Prefix of every namespace the harness makes: `wsp-<pid>-<n>-<host>`.
const PREFIX: &str = "wsp-";
/// The nft table each host's rules live in.
const TABLE: &str = "wsptest";
/// Bound on one TCP connect between test hosts: a partition must not hang a test.
pub const CONNECT_WAIT: Duration = Duration::from_secs(3);

/// One test host: a network namespace with one address on the bridge.
#[derive(Clone, Debug)]
pub struct Host {
    pub name: String,
    pub ns: String,
    pub ip: Ipv4Addr,
    /// The bridge port (in the bridge namespace) that is this host's link.
    port: String,
    /// Whether its nft table exists yet.
    nft: std::cell::Cell<bool>,
}

impl Host {
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip, port))
    }
}

/// A set of test hosts on one private subnet, removed on drop.
pub struct Testbed {
    base: String,
    bridge: String,
    hosts: Vec<Host>,
    /// Namespaces created so far, so a half-built testbed is removed too.
    created: Vec<String>,
}

/// An nft rule set added by `partition` or `refuse`, removed by `heal`.
#[must_use = "a fault stays until it is healed (or the testbed dropped)"]
pub struct Fault {
    ns: String,
    handles: Vec<(&'static str, u64)>,
}

impl Testbed {
    /// Creates one namespace per name, each with `eth0` on a shared bridge.
    pub fn new(names: &[&str]) -> Testbed {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        sweep_stale();
        let base = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let mut tb = Testbed {
            bridge: format!("{base}-br"),
            base,
            hosts: Vec::new(),
            created: Vec::new(),
        };
        let br = tb.bridge.clone();
        run("ip", &["netns", "add", &br]);
        tb.created.push(br.clone());
        run("ip", &["-n", &br, "link", "add", "br0", "type", "bridge"]);
        run("ip", &["-n", &br, "link", "set", "br0", "up"]);
        for (i, name) in names.iter().enumerate() {
            assert!(
                tb.hosts.iter().all(|h| h.name != *name),
                "two hosts named {name}"
            );
            let ns = format!("{}-{name}", tb.base);
            let port = format!("p{i}");
            let ip = Ipv4Addr::new(10, 77, 0, 10 + i as u8);
            run("ip", &["netns", "add", &ns]);
            tb.created.push(ns.clone());
            run("ip", &["-n", &ns, "link", "set", "lo", "up"]);
            run(
                "ip",
                &[
                    "-n", &br, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                    "netns", &ns,
                ],
            );
            run("ip", &["-n", &br, "link", "set", &port, "master", "br0"]);
            run("ip", &["-n", &br, "link", "set", &port, "up"]);
            run(
                "ip",
                &["-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
            );
            run("ip", &["-n", &ns, "link", "set", "eth0", "up"]);
            tb.hosts.push(Host {
                name: name.to_string(),
                ns,
                ip,
                port,
                nft: std::cell::Cell::new(false),
            });
        }
        for h in &tb.hosts {
            wait_link_up(&h.ns);
        }
        tb
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no test host {name}"))
    }

    pub fn ip(&self, name: &str) -> Ipv4Addr {
        self.host(name).ip
    }

    /// `program` run inside the host's namespace (`ip netns exec`, which execs it:
    /// the child's pid is the program's own).
    pub fn command(&self, host: &str, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.host(host).ns])
            .arg(program);
        cmd
    }

    /// A TCP connection made from inside `host`'s namespace (the socket keeps it),
    /// with `timeout` for reads and writes.
    pub fn connect(&self, host: &str, to: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        self.dialer(host).connect(to, timeout)
    }

    /// What makes `host`'s connections, for a thread that outlives this borrow.
    pub fn dialer(&self, host: &str) -> Dialer {
        Dialer {
            path: format!("/run/netns/{}", self.host(host).ns),
        }
    }

    /// Drops every packet between `host` and `peer` (only TCP to/from `port` on the
    /// peer when given), in both directions, on `host`'s side: what a firewall or
    /// a broken route does. Nothing is refused, so connects and reads hang.
    pub fn partition(&self, host: &str, peer: &str, port: Option<u16>) -> Fault {
        let peer = self.ip(peer);
        let (out_port, in_port) = match port {
            Some(p) => (format!(" tcp dport {p}"), format!(" tcp sport {p}")),
            None => (String::new(), String::new()),
        };
        let h = self.host(host);
        Fault {
            ns: h.ns.clone(),
            handles: vec![
                self.add_rule(h, "output", &format!("ip daddr {peer}{out_port} drop")),
                self.add_rule(h, "input", &format!("ip saddr {peer}{in_port} drop")),
            ],
        }
    }

    /// `host` answers TCP from `peer` to its `port` with a reset: a closed port, or
    /// a firewall that rejects rather than drops.
    pub fn refuse(&self, host: &str, peer: &str, port: u16) -> Fault {
        let peer = self.ip(peer);
        let h = self.host(host);
        Fault {
            ns: h.ns.clone(),
            handles: vec![self.add_rule(
                h,
                "input",
                &format!("ip saddr {peer} tcp dport {port} reject with tcp reset"),
            )],
        }
    }

    /// Removes a fault's rules: the network is whole again.
    pub fn heal(&self, fault: Fault) {
        for (chain, handle) in &fault.handles {
            run(
                "ip",
                &[
                    "netns",
                    "exec",
                    &fault.ns,
                    "nft",
                    "delete",
                    "rule",
                    "inet",
                    TABLE,
                    chain,
                    "handle",
                    &handle.to_string(),
                ],
            );
        }
    }

    /// Established TCP connections from `host` to `peer`'s `port`, as the host's
    /// kernel sees them.
    pub fn established(&self, host: &str, peer: &str, port: u16) -> usize {
        let dst = format!("dst {}:{port}", self.ip(peer));
        let out = run_sh(
            &self.host(host).ns,
            &format!("ss -tnH state established {dst}"),
        );
        out.lines().filter(|l| !l.trim().is_empty()).count()
    }

    /// Takes the host's bridge port down: its cable is pulled, nothing goes in or
    /// out, and no peer is told (no reset, no FIN).
    pub fn unplug(&self, host: &str) {
        let h = self.host(host);
        run("ip", &["-n", &self.bridge, "link", "set", &h.port, "down"]);
    }

    /// Puts the cable back, and waits until the host's `eth0` has its carrier
    /// (the kernel reports it with a delay, and until then connects fail with
    /// "no route to host").
    pub fn plug(&self, host: &str) {
        let h = self.host(host);
        // A host that comes back starts with an empty neighbour table; its old one
        // holds the failures of sockets that outlived their process.
        run("ip", &["-n", &h.ns, "neigh", "flush", "all"]);
        run("ip", &["-n", &self.bridge, "link", "set", &h.port, "up"]);
        wait_link_up(&h.ns);
    }

    /// Caps the host's link at `rate` (tc syntax, e.g. `1mbit`) in both directions:
    /// a token bucket on the bridge port (towards the host) and on its `eth0`.
    pub fn limit_rate(&self, host: &str, rate: &str) {
        let h = self.host(host);
        // A small bucket and a short queue: a burst drains at `rate` rather than
        // being absorbed, so the sender sees the slow link at once.
        let tbf = [
            "root", "tbf", "rate", rate, "burst", "16kb", "latency", "50ms",
        ];
        for (ns, dev) in [(&self.bridge, h.port.as_str()), (&h.ns, "eth0")] {
            let mut args = vec!["-n", ns, "qdisc", "replace", "dev", dev];
            args.extend_from_slice(&tbf);
            run("tc", &args);
        }
    }

    fn add_rule(&self, h: &Host, chain: &'static str, rule: &str) -> (&'static str, u64) {
        if !h.nft.get() {
            let script = format!(
                "table inet {TABLE} {{\n  chain input {{ type filter hook input priority 0; }}\n  \
                 chain output {{ type filter hook output priority 0; }}\n}}\n"
            );
            let mut child = Command::new("ip")
                .args(["netns", "exec", &h.ns, "nft", "-f", "-"])
                .stdin(Stdio::piped())
                .spawn()
                .expect("run nft (apt-get install nftables)");
            child
                .stdin
                .take()
                .unwrap()
                .write_all(script.as_bytes())
                .unwrap();
            assert!(child.wait().unwrap().success(), "nft table in {}", h.ns);
            h.nft.set(true);
        }
        // `-e -a` echoes the rule with its handle, which deleting it needs.
        let cmd = format!("nft -e -a add rule inet {TABLE} {chain} {rule}");
        let out = run_sh(&h.ns, &cmd);
        let handle = out
            .rsplit("# handle ")
            .next()
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no handle in nft's answer {out:?}"));
        (chain, handle)
    }
}

/// Makes TCP connections from inside one host's namespace.
#[derive(Clone, Debug)]
pub struct Dialer {
    /// The namespace's mount.
    path: String,
}

impl Dialer {
    /// A connection to `to`, with `timeout` for reads and writes.
    pub fn connect(&self, to: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        // setns changes the namespace of the calling thread only, so a short-lived
        // thread makes the socket and the test's own threads stay where they are.
        let s = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    enter_netns(&self.path)?;
                    TcpStream::connect_timeout(&to, CONNECT_WAIT)
                })
                .join()
                .expect("connect thread")
        })?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        Ok(s)
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for ns in self.created.iter().rev() {
            remove_netns(ns);
        }
    }
}

/// A process in a test host, killed (SIGKILL) on drop.
pub struct Proc {
    child: Child,
    pub stdout: Option<BufReader<ChildStdout>>,
}

impl Proc {
    /// Spawns `cmd` with stdout piped (kept open, so the program never gets EPIPE).
    pub fn spawn(mut cmd: Command) -> Proc {
        let mut child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let stdout = child.stdout.take().map(BufReader::new);
        Proc { child, stdout }
    }

    /// The first line the program prints (a server's "listening on" line).
    pub fn first_line(&mut self) -> String {
        let mut line = String::new();
        self.stdout
            .as_mut()
            .expect("stdout piped")
            .read_line(&mut line)
            .expect("read the first line");
        line
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it has exited (then the status).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until `eth0` in `ns` has its carrier: the kernel reports a new carrier
/// with a delay, and until then a connect fails with "no route to host".
fn wait_link_up(ns: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !run("ip", &["-n", ns, "-o", "link", "show", "eth0"]).contains("state UP") {
        assert!(
            std::time::Instant::now() < deadline,
            "{ns}: eth0 did not come up"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Joins the calling thread to the namespace mounted at `path`.
fn enter_netns(path: &str) -> io::Result<()> {
    let f = File::open(path)?;
    // SAFETY: setns takes a descriptor we own and changes only this thread's network
    // namespace; it touches no memory of ours.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Kills what still runs in a namespace (a process the test leaked), then deletes it.
fn remove_netns(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                // SAFETY: a plain syscall on a pid that lives in our own namespace.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    let _ = Command::new("ip")
        .args(["netns", "del", ns])
        .stderr(Stdio::null())
        .status();
}

/// Removes namespaces left by a test process that was killed before its drop ran
/// (their names carry its pid, and no process has that pid any more).
fn sweep_stale() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            remove_netns(&name);
        }
    }
}

/// Runs a command that must succeed; its stdout.
fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} {}: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a shell command line inside a namespace; its stdout.
fn run_sh(ns: &str, line: &str) -> String {
    run("ip", &["netns", "exec", ns, "sh", "-c", line])
}
