//! Wires the layers together: flags → queue backend → signal thread → reactor.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::process::ExitCode;

use wspush::config::{self, Command, Config, QueueSpec};
use wspush::queue::cluster::{ClusterQueue, ClusterSettings};
use wspush::queue::disque::{DisqueQueue, DisqueSettings};
use wspush::queue::redis::{RedisQueue, RedisSettings};
use wspush::queue::{Notifier, Queue, list::ListQueue};
use wspush::server::{self, Parts, Server};

/// What every build has, before the Cargo features it was built with.
const FEATURES: &str = "queue-list queue-redis queue-redis-cluster queue-disque";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cfg = match config::parse(&args) {
        Ok(Command::Run(cfg)) => *cfg,
        Ok(Command::Help(text)) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("wspush {}", env!("CARGO_PKG_VERSION"));
            println!("commit: {}", env!("WSPUSH_GIT_COMMIT"));
            let cargo_features = env!("WSPUSH_FEATURES");
            let sep = if cargo_features.is_empty() { "" } else { " " };
            println!("features: {FEATURES}{sep}{cargo_features}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("wspush: {e} (see wspush -h)");
            return ExitCode::from(2);
        }
    };
    wspush::log::set_level(cfg.log);
    raise_fd_limit(cfg.max_connections);
    match run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wspush: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cfg: Config) -> Result<(), Box<dyn std::error::Error>> {
    let addr = bind_addr(&cfg.bind, cfg.port)?;
    let listener =
        listen(addr, cfg.listen_backlog).map_err(|e| format!("listen on {addr}: {e}"))?;

    let (poll, waker) = server::poll_and_waker()?;
    let (tx, inbound) = crossbeam_channel::bounded(cfg.inbound_size);
    let notifier = Notifier::new(tx, waker);
    let queue: Box<dyn Queue> = match &cfg.queue {
        QueueSpec::List => Box::new(ListQueue::start(cfg.queue_size, notifier.clone())?),
        QueueSpec::Redis(url) => Box::new(RedisQueue::start(
            RedisSettings::from_config(url, &cfg),
            notifier.clone(),
        )?),
        QueueSpec::RedisCluster(seeds) => Box::new(ClusterQueue::start(
            ClusterSettings::from_config(seeds, &cfg),
            notifier.clone(),
        )?),
        QueueSpec::Disque(addr) => Box::new(DisqueQueue::start(
            DisqueSettings::from_config(addr, &cfg),
            notifier.clone(),
        )?),
    };
    watch_signals(notifier.clone())?;

    let backend = queue.name();
    let mut server = Server::new(
        cfg,
        Parts {
            poll,
            listener,
            queue,
            inbound,
            notifier,
        },
    )?;
    // Tests and scripts read this line to learn the port (e.g. with -port=0).
    println!(
        "wspush listening on {} (queue: {backend})",
        server.local_addr()?
    );
    std::io::stdout().flush()?;
    server.run()?;
    Ok(())
}

/// A non-blocking listening socket with `-listen-backlog`, set up as mio's own
/// `TcpListener::bind` does apart from the backlog.
fn listen(addr: SocketAddr, backlog: usize) -> std::io::Result<mio::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // Quick restarts rebind at once; on Windows this option would allow hijacking.
    #[cfg(not(windows))]
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())?;
    sock.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    sock.set_nonblocking(true)?;
    Ok(mio::net::TcpListener::from_std(sock.into()))
}

/// The address for `-bind`. IP literals (the default `0.0.0.0`, `127.0.0.1`, `::`,
/// `[::1]`) and `localhost` need no resolver; only another host name goes through
/// the system's. (A static glibc build reads /etc/hosts and DNS itself but loads any
/// other NSS module named in /etc/nsswitch.conf from the system at run time.)
fn bind_addr(bind: &str, port: u16) -> Result<SocketAddr, String> {
    let host = bind
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(bind);
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    if host.eq_ignore_ascii_case("localhost") {
        return Ok(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port));
    }
    (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve -bind={bind}: {e}"))?
        .next()
        .ok_or_else(|| format!("cannot resolve -bind={bind}"))
}

/// Lifts the soft descriptor limit toward the hard one: the default soft limit
/// (often 1024) is far below what a push server holds open.
#[cfg(unix)]
fn raise_fd_limit(max_connections: usize) {
    // Listener, poll, waker, channels and std streams: a small fixed overhead.
    let wanted = max_connections.saturating_add(64) as libc::rlim_t;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read or write the struct passed to them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        if lim.rlim_cur < wanted {
            let old = lim.rlim_cur;
            lim.rlim_cur = lim.rlim_max.min(wanted);
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                lim.rlim_cur = old;
            }
        }
    }
    if lim.rlim_cur < wanted {
        wspush::info!(
            "descriptor limit {} is below -max-connections={max_connections}; accept will pause when it runs out",
            lim.rlim_cur
        );
    }
}

#[cfg(not(unix))]
fn raise_fd_limit(_max_connections: usize) {}

/// The first SIGINT/SIGTERM asks for a graceful shutdown; a second one exits at once.
#[cfg(unix)]
fn watch_signals(notifier: Notifier) -> std::io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    std::thread::Builder::new()
        .name("wspush-signals".into())
        .spawn(move || {
            let mut asked = false;
            for _ in signals.forever() {
                if asked {
                    std::process::exit(1);
                }
                asked = true;
                notifier.request_shutdown();
            }
        })?;
    Ok(())
}

/// Ctrl-C or Ctrl-Break in the console asks for a graceful shutdown; a second one
/// exits at once.
#[cfg(windows)]
fn watch_signals(notifier: Notifier) -> std::io::Result<()> {
    let mut asked = false;
    ctrlc::set_handler(move || {
        if asked {
            std::process::exit(1);
        }
        asked = true;
        notifier.request_shutdown();
    })
    .map_err(std::io::Error::other)
}

/// Elsewhere the process ends on the platform's default signal action.
#[cfg(not(any(unix, windows)))]
fn watch_signals(_notifier: Notifier) -> std::io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_accepts_ip_literals_and_localhost_without_a_resolver() {
        let a = |s: &str| bind_addr(s, 3210).unwrap().to_string();
        assert_eq!(a("0.0.0.0"), "0.0.0.0:3210");
        assert_eq!(a("127.0.0.1"), "127.0.0.1:3210");
        assert_eq!(a("::"), "[::]:3210");
        assert_eq!(a("[::1]"), "[::1]:3210");
        assert_eq!(a("LocalHost"), "127.0.0.1:3210");
    }
}
