#!/usr/bin/env python3
"""Messages read from Redis per node: four wspush nodes on one redis-server, N uids
spread evenly over them (one idle push connection each), unicast to random uids at
a fixed rate plus a broadcast now and then. Prints, per node, `queue.received` (what
the node read from Redis) and `messages_routed` (what it fanned out), as JSON.

With interest routing a node reads about 1/nodes of the unicast plus every
broadcast; a build from before it (one channel that every node reads, no
`queue.received`) routes everything on every node, which `messages_routed` shows.
`--cluster` runs the same on a Redis Cluster of three primaries (sharded pub/sub,
`-queue=redis-cluster/…`) instead of one redis-server.

    loadtest/routing.py --binary target/release/wspush
    loadtest/routing.py --binary target/release/wspush --cluster
    loadtest/routing.py --binary /path/to/an/older/wspush   # the one-channel figure

A figure for the notes, not a timed test: nothing here asserts.
"""

import argparse
import base64
import json
import os
import random
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, what, proc, within=10.0, log=None):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = open(log, "rb").read()[-400:].decode(errors="replace") if log else ""
            sys.exit(f"{what} exited with {proc.returncode} {tail}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{what} did not listen on {port}")


def http(port, method, path, body=None):
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=body, method=method
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, r.read()


def stats(port):
    return json.loads(http(port, "GET", "/stats")[1])


def open_ws(port, uid):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(
        (
            f"GET /ws?uid={uid} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            sys.exit(f"connection for uid {uid} closed during the handshake")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        sys.exit(f"uid {uid}: {head.splitlines()[0]!r}")
    return s


def start_redis(args, tmp, procs):
    """One redis-server, or (--cluster) three cluster primaries; the -queue= value."""
    ports = [free_port() for _ in range(3 if args.cluster else 1)]
    for port in ports:
        cmd = [args.redis, "--port", str(port), "--save", "", "--appendonly", "no",
               "--dir", os.path.join(tmp, str(port))]
        if args.cluster:
            # The bus port would be port + 10000, past 65535 for a high free port.
            cmd += ["--cluster-enabled", "yes", "--cluster-port", str(free_port())]
        os.makedirs(cmd[cmd.index("--dir") + 1])
        log = open(os.path.join(tmp, f"redis-{port}.log"), "wb")
        redis = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        procs.append(redis)
        wait_port(port, "redis-server", redis, log=log.name)
    if not args.cluster:
        return f"-queue=redis/127.0.0.1:{ports[0]}"
    cli = shutil.which("redis-cli") or "redis-cli"
    addrs = [f"127.0.0.1:{p}" for p in ports]
    subprocess.run([cli, "--cluster", "create", *addrs, "--cluster-yes"],
                   check=True, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not all(
        b"cluster_state:ok" in subprocess.run(
            [cli, "-p", str(p), "cluster", "info"], capture_output=True).stdout
        for p in ports
    ):
        if time.monotonic() > deadline:
            sys.exit("the cluster never reached cluster_state:ok")
        time.sleep(0.1)
    return "-queue=redis-cluster/" + ",".join(addrs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--binary", required=True, help="the wspush binary")
    ap.add_argument("--redis", default=shutil.which("redis-server") or "redis-server")
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--uids", type=int, default=10_000)
    ap.add_argument("--rate", type=int, default=500, help="unicast messages per second")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--broadcast-every", type=float, default=1.0, help="seconds")
    ap.add_argument("--cluster", action="store_true",
                    help="a Redis Cluster of three primaries instead of one redis-server")
    args = ap.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.uids + 256
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))

    procs = []
    tmp = tempfile.mkdtemp(prefix="wspush-routing-")
    try:
        queue = start_redis(args, tmp, procs)
        ports = []
        for _ in range(args.nodes):
            port = free_port()
            node = subprocess.Popen(
                [args.binary, "-bind=127.0.0.1", f"-port={port}", queue, "-log=warn"],
            )
            procs.append(node)
            wait_port(port, "wspush", node)
            ports.append(port)
        for port in ports:
            deadline = time.monotonic() + 10
            while stats(port)["queue"]["state"] != "up":
                if time.monotonic() > deadline:
                    sys.exit("a node never came up")
                time.sleep(0.05)

        conns = [open_ws(ports[u % args.nodes], f"u{u}") for u in range(args.uids)]
        for port in ports:
            deadline = time.monotonic() + 30
            while stats(port)["connections"] < args.uids // args.nodes:
                if time.monotonic() > deadline:
                    sys.exit("connections missing")
                time.sleep(0.1)
        # Joins are settled: subscriptions made, nothing else in flight.
        time.sleep(1)
        before = [stats(p) for p in ports]

        sent = broadcasts = 0
        start = time.monotonic()
        next_broadcast = start
        while (now := time.monotonic()) - start < args.seconds:
            due = int((now - start) * args.rate)
            while sent < due:
                uid = random.randrange(args.uids)
                body = json.dumps({"topic": "uids", "topic_ids": [f"u{uid}"], "msg": sent})
                http(ports[sent % args.nodes], "POST", "/send", body.encode())
                sent += 1
            if now >= next_broadcast:
                http(ports[0], "POST", "/send", json.dumps({"topic": "all", "msg": "b"}).encode())
                broadcasts += 1
                next_broadcast += args.broadcast_every
            time.sleep(0.001)
        time.sleep(1)
        after = [stats(p) for p in ports]

        def delta(a, b, *path):
            for k in path:
                a, b = a.get(k) if a else None, b.get(k) if b else None
            return None if a is None or b is None else b - a

        per_node = [
            {
                "node": i,
                "uids": args.uids // args.nodes,
                "received": delta(b, a, "queue", "received"),
                "routed": delta(b, a, "messages_routed"),
            }
            for i, (b, a) in enumerate(zip(before, after))
        ]
        out = {
            "redis": "cluster of 3 primaries" if args.cluster else "one redis-server",
            "nodes": args.nodes,
            "uids": args.uids,
            "unicast_sent": sent,
            "broadcasts_sent": broadcasts,
            "expected_per_node_with_routing": sent / args.nodes + broadcasts,
            "per_node": per_node,
        }
        print(json.dumps(out, indent=2))
        for c in conns:
            c.close()
    finally:
        # The nodes first, then Redis, so that no node logs a lost Redis.
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
