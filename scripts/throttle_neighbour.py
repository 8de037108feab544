#!/usr/bin/env python3
"""A throttled daemon next to a busy one: does waiting on an I/O limit cost
the neighbour anything?

Two disks, each its own fresh COW overlay of one golden image. Daemon B
serves 4 KiB random reads at QD32 as fast as it can; daemon A is limited
(`--throttle-iops`) and its client keeps QD32 outstanding, so A's guest
always waits on the limit. B's IOPS with A so throttled are compared with
B's IOPS next to an idle A (interleaved repetitions, medians), and A's CPU
time over the run is reported as a share of one core. The same is run with
qemu-storage-daemon as A (a throttle-group node over its qcow2 overlay) and
as B, side by side. A benchmark, run on demand (docs/benchmarks.md,
"A throttled neighbour"); nothing in it passes or fails.

    scripts/throttle_neighbour.py [--limit 200] [--runtime 5] [--reps 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the shared daemon, image and build helpers)

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


class Neighbours(bench.Workspace):
    def __init__(self, a: argparse.Namespace):
        super().__init__(a)
        self.seq = 0

    def overlay(self, who: str, name: str) -> Path:
        p = self.work / (f"{name}.cow" if who == "ours" else f"{name}.qcow2")
        return bench.new_overlay(self.ours, who, p, self.base)

    def start(self, who: str, name: str, limit: int | None):
        """A daemon serving a fresh overlay; `limit` IOPS if given."""
        self.seq += 1
        sock = self.work / f"{who}-{name}.sock"
        logf = self.out / "logs" / f"{who}-{name}-{self.seq}.log"
        disk = self.overlay(who, name)
        if who == "ours":
            argv = [str(self.ours), "serve", "--socket-path", str(sock), "--num-queues", "1",
                    "--disk", str(disk), "--format", "cow", "--backing", str(self.base)]
            if limit:
                argv += ["--throttle-iops", f"total={limit}"]
            return bench.Daemon(argv, sock, logf)
        argv = ["qemu-storage-daemon",
                "--blockdev", f"driver=file,node-name=b0,filename={self.base},aio=io_uring,"
                "cache.direct=off,read-only=on",
                "--blockdev", "driver=raw,node-name=braw,file=b0,read-only=on",
                "--blockdev", f"driver=file,node-name=f0,filename={disk},aio=io_uring,"
                "cache.direct=off",
                "--blockdev", "driver=qcow2,node-name=d0,file=f0,backing=braw"]
        node = "d0"
        if limit:
            argv += ["--object", f"throttle-group,id=tg0,x-iops-total={limit}",
                     "--blockdev", "driver=throttle,node-name=t0,throttle-group=tg0,file=d0"]
            node = "t0"
        argv += ["--export", f"type=vhost-user-blk,id=e0,node-name={node},addr.type=unix,"
                 f"addr.path={sock},writable=on,num-queues=1"]
        return bench.Daemon(argv, sock, logf)

    def client(self, sock: Path, runtime: float, seed: int) -> subprocess.Popen:
        argv = [str(self.load), "--socket", str(sock), "--pattern", "randread", "--bs", "4k",
                "--iodepth", "32", "--queues", "1", "--runtime", str(runtime),
                "--ramp", str(self.a.ramp), "--seed", str(seed), "--json"]
        return subprocess.Popen(bench.taskset("client") + argv, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def result(self, p: subprocess.Popen) -> dict:
        out, err = p.communicate(timeout=self.a.runtime + self.a.ramp + 120)
        if p.returncode not in (0, 3) or not out.strip():
            raise RuntimeError(f"load generator failed ({p.returncode}): {err}")
        return json.loads(out)

    def one(self, a_who: str, b_who: str, throttled: bool, rep: int) -> dict:
        """B under load; A throttled with a waiting client, or idle."""
        a = self.start(a_who, "a", self.a.limit if throttled else None)
        b = self.start(b_who, "b", None)
        try:
            bench.warm(self.base)
            cpu0 = cpu_seconds(a.pid)
            t0 = time.monotonic()
            # A's client runs past B's so that B's whole run has a waiting A.
            pa = self.client(a.sock, self.a.runtime + 1, 7) if throttled else None
            pb = self.client(b.sock, self.a.runtime, 11)
            rb = self.result(pb)
            ra = self.result(pa) if pa else None
            a_cpu = (cpu_seconds(a.pid) - cpu0) / (time.monotonic() - t0)
        finally:
            a.stop()
            b.stop()
        rec = {"a": a_who, "b": b_who, "a_throttled": throttled, "rep": rep,
               "b_iops": rb["iops"], "b_errors": rb["errors"], "a_cpu_share": a_cpu}
        if ra:
            rec["a_iops"] = ra["iops"]
            rec["a_errors"] = ra["errors"]
        bench.log(f"A={a_who}{' throttled' if throttled else ' idle'} B={b_who} rep {rep}: "
                  f"B {rb['iops']:.0f} IOPS, A {a_cpu * 100:.1f}% of a core"
                  + (f", A {ra['iops']:.0f} IOPS" if ra else ""))
        return rec


def summarise(runs: list[dict], limit: int) -> list[dict]:
    rows = []
    for a_who, b_who in sorted({(r["a"], r["b"]) for r in runs}):
        def of(t: bool, key: str) -> list[float]:
            return [r[key] for r in runs
                    if r["a"] == a_who and r["b"] == b_who and r["a_throttled"] == t and key in r]
        idle, busy = statistics.median(of(False, "b_iops")), statistics.median(of(True, "b_iops"))
        rows.append({"a": a_who, "b": b_who, "limit": limit,
                     "b_iops_next_to_idle_a": idle, "b_iops_next_to_throttled_a": busy,
                     "ratio": busy / idle if idle else None,
                     "a_iops": statistics.median(of(True, "a_iops")),
                     "a_cpu_share_throttled": statistics.median(of(True, "a_cpu_share")),
                     "a_cpu_share_idle": statistics.median(of(False, "a_cpu_share"))})
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    out = [f"Throttled neighbour, {meta['date']}: A limited to {meta['limit']} IOPS with "
           f"QD32 waiting; B 4 KiB random reads QD32; {meta['runtime']} s, "
           f"median of {meta['reps']}; load average {meta['loadavg']}", "",
           "| A (throttled) | B | B IOPS, A idle | B IOPS, A throttled | ratio | "
           "A IOPS | A CPU, throttled | A CPU, idle |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['a']} | {r['b']} | {r['b_iops_next_to_idle_a']:.0f} | "
                   f"{r['b_iops_next_to_throttled_a']:.0f} | {r['ratio']:.3f} | "
                   f"{r['a_iops']:.0f} | {r['a_cpu_share_throttled'] * 100:.2f}% | "
                   f"{r['a_cpu_share_idle'] * 100:.2f}% |")
    return "\n".join(out) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=200, help="A's IOPS limit (default 200)")
    p.add_argument("--size", type=bench.parse_size, default=1 << 30,
                   help="golden image size (default 1G)")
    p.add_argument("--runtime", type=float, default=5.0, help="measured seconds of B")
    p.add_argument("--ramp", type=float, default=1.0, help="warm-up seconds")
    p.add_argument("--reps", type=int, default=3, help="repetitions of each case")
    p.add_argument("--no-qsd", action="store_true", help="only our daemon as A and B")
    p.add_argument("--pin", choices=["split", "none"], default="split",
                   help="split (default): both daemons on CPU 0, the clients on the others, "
                   "so that A's wake-ups compete with B's daemon; none: unpinned")
    p.add_argument("--workdir", default="/var/tmp/vhost-user-cow-neighbour")
    p.add_argument("--output", help="results directory (default bench-results/neighbour-DATE)")
    p.add_argument("--bin-dir", help="where vhost-user-cow and vhost-user-cow-load are "
                   "(default: build them in release mode)")
    a = p.parse_args()
    if not a.output:
        a.output = str(bench.ROOT / "bench-results" /
                       f"neighbour-{dt.datetime.now():%Y%m%d-%H%M%S}")
    if not a.bin_dir:
        target = Path(os.environ.get("CARGO_TARGET_DIR", bench.ROOT / "target"))
        bench.log("building release binaries")
        bench.run(["cargo", "build", "--release", "--quiet",
                   "-p", "vhost-user-cow", "--bin", "vhost-user-cow",
                   "-p", "vhost-user-cow-load", "--bin", "vhost-user-cow-load"], cwd=bench.ROOT)
        a.bin_dir = str(target / "release")
    bench.PIN["mode"] = a.pin
    n = Neighbours(a)
    n.make_base()
    pairs = [("ours", "ours")] + ([] if a.no_qsd else [("qsd", "qsd")])
    runs = []
    for rep in range(a.reps):
        for a_who, b_who in pairs:
            # Interleaved, so that drift in the machine's load hits both.
            for throttled in (False, True):
                runs.append(n.one(a_who, b_who, throttled, rep))
    meta = {"pin": a.pin, "limit": a.limit, "runtime": a.runtime, "reps": a.reps, "size": a.size,
            "date": f"{dt.datetime.now():%Y-%m-%d %H:%M}", "loadavg": bench.loadavg()}
    rows = summarise(runs, a.limit)
    Path(a.output, "neighbour.json").write_text(json.dumps({"meta": meta, "runs": runs,
                                                            "summary": rows}, indent=1))
    text = markdown(rows, meta)
    Path(a.output, "neighbour.md").write_text(text)
    print(text)
    return 1 if any(r.get("b_errors") or r.get("a_errors") for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
