//! Wires the layers together: flags → queue backend → signal thread → reactor.

use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;

use wspush::config::{self, Command, Config, QueueSpec};
use wspush::queue::disque::DisqueQueue;
use wspush::queue::redis::RedisQueue;
use wspush::queue::{Inbound, Notifier, Queue, list::ListQueue};
use wspush::server::{self, Parts, Server};

/// Events the queue side may have in flight towards the reactor.
const INBOUND_CAPACITY: usize = 1024;

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
    let addr: SocketAddr = (cfg.bind.as_str(), cfg.port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| format!("cannot resolve -bind={}", cfg.bind))?;
    let listener =
        mio::net::TcpListener::bind(addr).map_err(|e| format!("listen on {addr}: {e}"))?;

    let (poll, waker) = server::poll_and_waker()?;
    let (tx, inbound) = crossbeam_channel::bounded(INBOUND_CAPACITY);
    let notifier = Notifier::new(tx, waker);
    let queue: Box<dyn Queue> = match &cfg.queue {
        QueueSpec::List => Box::new(ListQueue::start(cfg.queue_size, notifier.clone())?),
        QueueSpec::Redis(url) => Box::new(RedisQueue::start(url, &cfg, notifier.clone())?),
        QueueSpec::Disque(addr) => Box::new(DisqueQueue::start(addr, &cfg, notifier.clone())?),
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
                let _ = notifier.send(Inbound::Shutdown);
            }
        })?;
    Ok(())
}

#[cfg(not(unix))]
fn watch_signals(_notifier: Notifier) -> std::io::Result<()> {
    Ok(())
}
