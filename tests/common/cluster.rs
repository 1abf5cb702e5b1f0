//! A real Redis Cluster for the tests: six `redis-server --cluster-enabled yes` on
//! loopback ports, three primaries with a replica each, built by
//! `redis-cli --cluster create`, and removed when dropped. The pieces that do not
//! depend on loopback (the server flags, the create, reading the slot map) are
//! shared with the multi-host cluster of tests/netns.rs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{
    Resp, RespClient, TempDir, WAIT, free_port, require_program, wait_for_ping, wait_until,
};

/// `redis-server` flags of a cluster node, besides its address and directory: a
/// short node timeout so a dead primary's replica is promoted after about a
/// second, and a replica that syncs at once rather than after waiting 5 s for
/// others to join.
pub const NODE_ARGS: &[&str] = &[
    "--cluster-enabled",
    "yes",
    "--cluster-node-timeout",
    "1000",
    "--repl-diskless-sync-delay",
    "0",
];

/// Runs `redis-cli --cluster create` (`cli`, a command for redis-cli on some host)
/// over `addrs`: three primaries with a replica each.
pub fn create(mut cli: Command, addrs: &[String]) {
    let out = cli
        .args(["--cluster", "create"])
        .args(addrs)
        .args(["--cluster-replicas", "1", "--cluster-yes"])
        .stdout(Stdio::null())
        .output()
        .expect("run redis-cli --cluster create");
    assert!(
        out.status.success(),
        "redis-cli --cluster create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether the node says `cluster_state:ok` and its replication is in sync: a
/// primary has a replica online, a replica has its link to the primary up.
pub fn settled(c: &mut RespClient) -> bool {
    if !c
        .cmd(&["CLUSTER", "INFO"])
        .text()
        .contains("cluster_state:ok")
    {
        return false;
    }
    let info = c.cmd(&["INFO", "replication"]).text();
    if info.contains("role:master") {
        replica_addr(&info).is_some() && info.contains("state=online")
    } else {
        info.contains("master_link_status:up")
    }
}

/// Each primary's address with its slot ranges, from a `CLUSTER SLOTS` reply.
pub fn slot_map(slots: &Resp) -> Vec<(SocketAddr, Vec<(u16, u16)>)> {
    let mut out: Vec<(SocketAddr, Vec<(u16, u16)>)> = Vec::new();
    for r in slots.array() {
        let r = r.array();
        let range = (r[0].text().parse().unwrap(), r[1].text().parse().unwrap());
        let node = r[2].array();
        let ip = node[0].text().parse().expect("a primary's ip");
        let addr = SocketAddr::new(ip, node[1].text().parse().unwrap());
        match out.iter_mut().find(|(a, _)| *a == addr) {
            Some((_, ranges)) => ranges.push(range),
            None => out.push((addr, vec![range])),
        }
    }
    out.sort();
    out
}

/// The first replica an `INFO replication` of a primary names.
pub fn replica_addr(info: &str) -> Option<SocketAddr> {
    let line = info.lines().find_map(|l| l.strip_prefix("slave0:"))?;
    let field = |k: &str| line.split(',').find_map(|kv| kv.strip_prefix(k));
    let ip = field("ip=")?.parse().ok()?;
    Some(SocketAddr::new(ip, field("port=")?.parse().ok()?))
}

/// One uid (`<prefix><n>`) per primary of `primaries` (a slot map): the slot of
/// its stream (`<queue name>:{u:<uid>}:h`) is that primary's.
pub fn uid_per_primary<K: Copy + PartialEq>(
    client: &mut RespClient,
    primaries: &[(K, Vec<(u16, u16)>)],
    name: &str,
    prefix: &str,
) -> Vec<(K, String)> {
    let mut out: Vec<(K, String)> = Vec::new();
    for n in 0.. {
        let uid = format!("{prefix}{n}");
        let key = format!("{name}:{{u:{uid}}}:h");
        let slot: u16 = client
            .cmd(&["CLUSTER", "KEYSLOT", &key])
            .text()
            .parse()
            .unwrap();
        let (owner, _) = primaries
            .iter()
            .find(|(_, r)| r.iter().any(|(a, b)| (*a..=*b).contains(&slot)))
            .expect("every slot has an owner");
        if !out.iter().any(|(o, _)| o == owner) {
            out.push((*owner, uid));
        }
        if out.len() == primaries.len() {
            return out;
        }
    }
    unreachable!("the uids ran out")
}

/// One node of the cluster.
pub struct ClusterNode {
    child: Option<Child>,
    pub port: u16,
    bus: u16,
    dir: TempDir,
}

pub struct RedisCluster {
    pub nodes: Vec<ClusterNode>,
    bin: PathBuf,
}

/// The major version `redis-server --version` reports (`… v=7.0.15 …`).
fn major_version(bin: &PathBuf) -> Option<u32> {
    let out = Command::new(bin).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let v = text.split("v=").nth(1)?;
    v.split('.').next()?.parse().ok()
}

impl RedisCluster {
    /// Six nodes in one cluster. Like the other Redis tests, it fails without
    /// redis-server and redis-cli 7+ (`.ci/run` installs them): a test that did not
    /// run must not pass.
    pub fn start() -> RedisCluster {
        let bin = require_program("redis-server", "REDIS_SERVER", "redis-server");
        let cli = require_program("redis-cli", "REDIS_CLI", "redis-tools");
        assert!(
            major_version(&bin).is_some_and(|v| v >= 7),
            "{} is older than Redis 7: Redis Cluster needs sharded pub/sub",
            bin.display()
        );
        let mut c = RedisCluster {
            nodes: Vec::new(),
            bin,
        };
        for _ in 0..6 {
            let mut n = ClusterNode {
                child: None,
                port: free_port(),
                bus: free_port(),
                dir: TempDir::new("cluster"),
            };
            c.spawn(&mut n);
            c.nodes.push(n);
        }
        let addrs: Vec<String> = c
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        create(Command::new(cli), &addrs);
        c.wait_ok();
        c
    }

    fn spawn(&self, n: &mut ClusterNode) {
        let port = n.port.to_string();
        // The bus port defaults to port + 10000, past 65535 for a high free port.
        let bus = n.bus.to_string();
        let mut child = Command::new(&self.bin)
            .args(["--port", &port, "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "no", "--cluster-port", &bus])
            .args(NODE_ARGS)
            .arg("--dir")
            .arg(&n.dir.0)
            .stdout(Stdio::null())
            .spawn()
            .expect("start redis-server");
        wait_for_ping(n.port, &mut child, "redis-server (cluster)");
        n.child = Some(child);
    }

    /// Waits until every running node says `cluster_state:ok` and every primary
    /// has a replica in sync.
    pub fn wait_ok(&self) {
        wait_until("cluster_state:ok on every node", WAIT * 3, || {
            self.nodes.iter().filter(|n| n.child.is_some()).all(|n| {
                RespClient::connect(n.port)
                    .map(|mut c| settled(&mut c))
                    .unwrap_or(false)
            }) && self.primaries().len() == 3
        });
    }

    /// The `-queue=` value: two seeds are enough to find the rest.
    pub fn queue_flag(&self) -> String {
        format!(
            "-queue=redis-cluster/127.0.0.1:{},127.0.0.1:{}",
            self.nodes[0].port, self.nodes[1].port
        )
    }

    /// A client of any running node.
    pub fn client(&self) -> RespClient {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .find_map(|n| RespClient::connect(n.port).ok())
            .expect("a running cluster node")
    }

    /// Each primary's port with its slot ranges, from `CLUSTER SLOTS`.
    pub fn primaries(&self) -> Vec<(u16, Vec<(u16, u16)>)> {
        let slots = self.client().cmd(&["CLUSTER", "SLOTS"]);
        slot_map(&slots)
            .into_iter()
            .map(|(addr, ranges)| (addr.port(), ranges))
            .collect()
    }

    /// The slot of a key, as the cluster computes it.
    pub fn slot(&self, key: &str) -> u16 {
        self.client()
            .cmd(&["CLUSTER", "KEYSLOT", key])
            .text()
            .parse()
            .unwrap()
    }

    /// The port of the primary owning `key`'s slot.
    pub fn owner(&self, key: &str) -> u16 {
        let slot = self.slot(key);
        self.primaries()
            .into_iter()
            .find(|(_, ranges)| ranges.iter().any(|(a, b)| (*a..=*b).contains(&slot)))
            .map(|(p, _)| p)
            .expect("every slot has an owner")
    }

    /// A replica of the primary on `port`.
    pub fn replica_of(&self, port: u16) -> u16 {
        let mut c = RespClient::connect(port).unwrap();
        let info = c.cmd(&["INFO", "replication"]).text();
        replica_addr(&info)
            .expect("the primary has a replica")
            .port()
    }

    /// `CLUSTER FAILOVER` on the replica of the primary on `port`: a planned
    /// hand-over; returns once the replica says it is the primary.
    pub fn failover(&self, port: u16) -> u16 {
        let replica = self.replica_of(port);
        let mut c = RespClient::connect(replica).unwrap();
        assert_eq!(c.cmd(&["CLUSTER", "FAILOVER"]).text(), "OK");
        wait_until("the replica took over", WAIT, || {
            c.cmd(&["ROLE"]).array()[0].text() == "master"
        });
        replica
    }

    /// SIGKILL of the node on `port`.
    pub fn kill(&mut self, port: u16) {
        if let Some(n) = self.nodes.iter_mut().find(|n| n.port == port)
            && let Some(mut c) = n.child.take()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts a killed node again with its cluster config: it rejoins as a replica.
    pub fn restart(&mut self, port: u16) {
        let i = self.nodes.iter().position(|n| n.port == port).unwrap();
        let mut n = std::mem::replace(
            &mut self.nodes[i],
            ClusterNode {
                child: None,
                port,
                bus: 0,
                dir: TempDir::new("cluster-unused"),
            },
        );
        self.spawn(&mut n);
        self.nodes[i] = n;
    }

    /// Waits until `port` serves as a primary in `CLUSTER SLOTS`, or `within`.
    pub fn await_primary(&self, port: u16, within: Duration) -> Duration {
        let start = Instant::now();
        wait_until("the new primary in the slot map", within, || {
            self.primaries().iter().any(|(p, _)| *p == port)
        });
        start.elapsed()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl RedisCluster {
    /// Moves one slot, with its keys, from the primary on `from` to the one on
    /// `to`, as `redis-cli --cluster reshard` does: IMPORTING/MIGRATING, MIGRATE of
    /// its keys, then the new owner told to every primary.
    pub fn move_slot(&self, slot: u16, from: u16, to: u16) {
        let slot = slot.to_string();
        let mut src = RespClient::connect(from).unwrap();
        let mut dst = RespClient::connect(to).unwrap();
        let src_id = src.cmd(&["CLUSTER", "MYID"]).text();
        let dst_id = dst.cmd(&["CLUSTER", "MYID"]).text();
        let ok = |r: super::Resp| assert_eq!(r.text(), "OK", "{r:?}");
        ok(dst.cmd(&["CLUSTER", "SETSLOT", &slot, "IMPORTING", &src_id]));
        ok(src.cmd(&["CLUSTER", "SETSLOT", &slot, "MIGRATING", &dst_id]));
        loop {
            let keys = src.cmd(&["CLUSTER", "GETKEYSINSLOT", &slot, "100"]);
            let keys: Vec<String> = keys.array().iter().map(|k| k.text()).collect();
            if keys.is_empty() {
                break;
            }
            let port = to.to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
            args.extend(keys.iter().map(String::as_str));
            let r = src.cmd(&args);
            assert!(matches!(r.text().as_str(), "OK" | "NOKEY"), "{r:?}");
        }
        for (port, _) in self.primaries() {
            let mut c = RespClient::connect(port).unwrap();
            ok(c.cmd(&["CLUSTER", "SETSLOT", &slot, "NODE", &dst_id]));
        }
    }
}
