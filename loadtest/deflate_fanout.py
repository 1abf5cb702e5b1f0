#!/usr/bin/env python3
"""Bytes on the wire and server CPU per delivery, permessage-deflate on vs off.

Starts `wspush` twice (-deflate=off, then -deflate=on), opens N WebSocket
connections to it (offering permessage-deflate), broadcasts M pushes of a
~300-byte JSON to them one /send at a time, waits until every connection has
every push, and reports what the clients received (TCP payload bytes: the
frames) and the server's CPU time (utime+stime from /proc/PID/stat) per delivery, and the
server's RSS per idle connection (VmRSS after the handshakes, less before).

Usage: deflate_fanout.py --bin target/release/wspush [--conns 10000] [--messages 20]
Short by design: a few seconds per mode. Needs `ulimit -n` above N + 100.
"""
import argparse
import base64
import json
import os
import selectors
import socket
import subprocess
import sys
import time

# A typical push: an order update; the push JSON (with types, time, id) is ~300 bytes.
MSG = {
    "event": "order.updated",
    "order_id": "ORD-2024-000123456",
    "status": "shipped",
    "carrier": "DHL Express",
    "tracking": "JD014600006281234567",
    "eta": "2024-05-17T18:00:00+08:00",
    "items": [{"sku": "SKU-10042", "qty": 2}, {"sku": "SKU-20077", "qty": 1}],
}
OFFER = "permessage-deflate; client_max_window_bits"


def start(binary, deflate, conns):
    args = [binary, "-port=0", "-bind=127.0.0.1", "-log=warn", f"-deflate={deflate}",
            f"-max-connections={conns + 100}", f"-max-per-ip=0", "-deflate-min=256"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    addr = next(w for w in line.split() if w.startswith("127.0.0.1:"))
    host, port = addr.rsplit(":", 1)
    return proc, (host, int(port))


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime, after the comm field


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def handshake(addr, i):
    s = socket.create_connection(addr)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET /ws?uid=u{i} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n"
               f"Sec-WebSocket-Extensions: {OFFER}\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            sys.exit("handshake: connection closed")
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    s.setblocking(False)
    return s, b"permessage-deflate" in head.lower(), head.split(b"\r\n\r\n", 1)[1]


def post(addr, body):
    s = socket.create_connection(addr)
    data = json.dumps(body, separators=(",", ":")).encode()
    s.sendall(b"POST /send HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
    reply = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        reply += chunk
    s.close()
    assert reply.startswith(b"HTTP/1.1 200"), reply


def frames_in(buf):
    """Counts whole frames at the front of buf; returns (frames, rsv1 frames, rest)."""
    n = c = 0
    while len(buf) >= 2:
        ln = buf[1] & 0x7F
        at = 2
        if ln == 126:
            if len(buf) < 4:
                break
            ln, at = int.from_bytes(buf[2:4], "big"), 4
        elif ln == 127:
            if len(buf) < 10:
                break
            ln, at = int.from_bytes(buf[2:10], "big"), 10
        if len(buf) < at + ln:
            break
        if buf[0] & 0x0F == 0x1:
            n += 1
            c += (buf[0] & 0x40) != 0
        buf = buf[at + ln:]
    return n, c, buf


def run(binary, deflate, conns, messages):
    proc, addr = start(binary, deflate, conns)
    try:
        socks = []
        negotiated = 0
        rss0 = rss_bytes(proc.pid)
        for i in range(conns):
            s, agreed, rest = handshake(addr, i)
            negotiated += agreed
            socks.append([s, bytearray(rest), 0])
        # Every handshake is answered once its 101 is read; the RSS now is idle connections'.
        rss_idle = (rss_bytes(proc.pid) - rss0) / conns
        sel = selectors.DefaultSelector()
        for entry in socks:
            sel.register(entry[0], selectors.EVENT_READ, entry)
        wire = 0
        compressed = 0
        before = cpu_ticks(proc.pid)
        t0 = time.time()
        for _ in range(messages):
            post(addr, {"topic": "all", "types": "order", "msg": MSG})
        done = 0
        deadline = time.time() + 120
        while done < conns:
            if time.time() > deadline:
                sys.exit(f"timed out: {done}/{conns} connections complete")
            for key, _ in sel.select(timeout=1):
                entry = key.data
                chunk = entry[0].recv(65536)
                wire += len(chunk)
                entry[1] += chunk
                n, c, rest = frames_in(bytes(entry[1]))
                entry[1] = bytearray(rest)
                entry[2] += n
                compressed += c
                if entry[2] >= messages:
                    sel.unregister(entry[0])
                    done += 1
        elapsed = time.time() - t0
        ticks = cpu_ticks(proc.pid) - before
        hz = os.sysconf("SC_CLK_TCK")
        deliveries = conns * messages
        for entry in socks:
            entry[0].close()
        return {
            "deflate": deflate,
            "connections": conns,
            "negotiated": negotiated,
            "messages": messages,
            "deliveries": deliveries,
            "compressed_frames": compressed,
            "wire_bytes": wire,
            "bytes_per_delivery": round(wire / deliveries, 1),
            "server_cpu_s": ticks / hz,
            "cpu_us_per_delivery": round(ticks / hz / deliveries * 1e6, 3),
            "elapsed_s": round(elapsed, 2),
            "rss_per_idle_connection": round(rss_idle),
        }
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--conns", type=int, default=10000)
    ap.add_argument("--messages", type=int, default=20)
    ap.add_argument("--modes", default="off,on", help="the -deflate values to run, in order")
    o = ap.parse_args()
    for mode in o.modes.split(","):
        print(json.dumps(run(o.bin, mode, o.conns, o.messages)), flush=True)


if __name__ == "__main__":
    main()
