#!/usr/bin/env python3
"""Runs the Autobahn|Testsuite cases 1.* to 10.*, 12.* and 13.* (driven by kosoku) against
`wspush -echo -deflate=on`
and compares every case's result with tests/autobahn/expected-results.json.

Exit status 1 when any case FAILED, or when any result differs from the checked-in
expectations (so a regression, or an improvement, shows up as a diff to review).
Usage: run.py --bin target/debug/wspush [--update] [--sections 12,13]
"""
import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
EXPECTED = HERE / "expected-results.json"
# Autobahn has no section 8; 12.* and 13.* are permessage-deflate (RFC 7692).
SECTIONS = (1, 2, 3, 4, 5, 6, 7, 9, 10, 12, 13)
# The conformance suite sends messages up to 16 MiB; the defaults (64 KiB) are for production.
LIMITS = ["-max-frame=16777216", "-max-message=16777216", "-max-backlog=67108864"]
# Every message of 12.* and 13.* is compressed: no threshold, so the server's side of
# the extension is exercised as much as the client's.
DEFLATE = ["-deflate=on", "-deflate-min=1"]


def start_server(binary):
    proc = subprocess.Popen(
        [binary, "-port=0", "-bind=127.0.0.1", "-echo", "-log=warn", *LIMITS, *DEFLATE],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    addr = next((w for w in line.split() if w.startswith("127.0.0.1:")), None)
    if addr is None:
        proc.kill()
        sys.exit(f"autobahn: wspush did not report its address: {line!r}")
    return proc, addr


def run_cases(addr, outdir, sections):
    kosoku = shutil.which("kosoku", path=os.path.dirname(sys.executable)) or "kosoku"
    args = [kosoku, f"ws://{addr}/ws", "-o", str(outdir), "-p", "2"]
    for n in sections:
        args += ["-i", f"{n}.*"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=2400)
    index = outdir / "index.json"
    if not index.exists():
        sys.exit(f"autobahn: kosoku wrote no report\n{done.stdout}\n{done.stderr}")
    agents = json.loads(index.read_text())
    (results,) = agents.values()
    return {case: [r["behavior"], r["behaviorClose"]] for case, r in results.items()}


def case_key(case):
    return [int(part) for part in case.split(".")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--update", action="store_true", help="rewrite the expectations")
    ap.add_argument("--sections", help="comma list of sections to run (default: all); only those are compared")
    opts = ap.parse_args()
    sections = [int(n) for n in opts.sections.split(",")] if opts.sections else SECTIONS

    proc, addr = start_server(opts.bin)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            got = run_cases(addr, pathlib.Path(tmp), sections)
        alive = proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    if not alive:
        sys.exit("autobahn: wspush died during the run")

    got = dict(sorted(got.items(), key=lambda kv: case_key(kv[0])))
    if opts.update:
        if opts.sections:
            kept = json.loads(EXPECTED.read_text())
            kept = {c: r for c, r in kept.items() if int(c.split(".")[0]) not in sections}
            got = dict(sorted({**kept, **got}.items(), key=lambda kv: case_key(kv[0])))
        lines = [f"  {json.dumps(case)}: {json.dumps(r)}" for case, r in got.items()]
        EXPECTED.write_text("{\n" + ",\n".join(lines) + "\n}\n")

        print(f"autobahn: wrote {len(got)} expectations to {EXPECTED}")
        return

    expected = json.loads(EXPECTED.read_text())
    if opts.sections:
        expected = {c: r for c, r in expected.items() if int(c.split(".")[0]) in sections}
    failed = [c for c, r in got.items() if "FAILED" in r]
    changed = [c for c in sorted(set(got) | set(expected), key=case_key) if got.get(c) != expected.get(c)]
    for case in changed:
        print(f"autobahn: {case}: expected {expected.get(case)}, got {got.get(case)}")
    counts = {}
    for behavior, _ in got.values():
        counts[behavior] = counts.get(behavior, 0) + 1
    summary = ", ".join(f"{n} {b}" for b, n in sorted(counts.items()))
    print(f"autobahn: {len(got)} cases ({summary}); {len(changed)} differ from {EXPECTED.name}")
    bad = len(set(failed) | set(changed))
    print(f"autobahn: {len(got) - bad} passed, {bad} failed")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
