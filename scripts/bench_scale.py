#!/usr/bin/env python3
"""Scale benchmark: what memory and start-up cost as the virtual size grows.

For vhost-user-cow and qemu-storage-daemon (a fresh qcow2 overlay of the
same size over the same backing file), each measured in a fresh process:

  empty      an empty overlay over backing files of --sizes (sparse): time
             from exec until the socket exists, RSS once it does (and the
             daemon's threads run), RSS after a short random-read load;
  written    1 GiB written at random (64 KiB writes) over a --written-size
             disk: RSS at the end of the writes, then RSS of a fresh daemon
             after random reads over the whole disk (every bitmap page /
             L2 table visited);
  info       `info` and `check` (qemu-img info / check) on an empty overlay
             and on one with 1 GiB written at random, at --info-size.

ext4 refuses files of 16 TiB, so the large disks live on tmpfs (--shm-dir,
/dev/shm); the written 1 TiB disk lives on --disk-dir (ext4 here). Results:
docs/benchmarks.md, "Scale". Not a test: nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


def parse_size(s: str) -> int:
    m = re.fullmatch(r"(\d+)([kmgt]?)", s.strip().lower())
    if not m:
        raise argparse.ArgumentTypeError(f"{s!r} is not a size")
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[m.group(2)]


def human(n: int) -> str:
    for unit, v in (("T", TiB), ("G", GiB), ("M", MiB)):
        if n >= v and n % v == 0:
            return f"{n // v} {unit}iB"
    return f"{n} B"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def status_kib(pid: int) -> dict:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0])
    return out


class Daemon:
    """A daemon started now; `ready_ms` is exec to socket file."""

    def __init__(self, argv: list[str], sock: Path, logfile: Path):
        sock.unlink(missing_ok=True)
        self.sock = sock
        self.logfh = open(logfile, "w")
        self.logfile = logfile
        t0 = time.monotonic()
        self.proc = subprocess.Popen(argv, stdout=self.logfh, stderr=subprocess.STDOUT)
        deadline = t0 + 30
        while not sock.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited {self.proc.returncode}: {' '.join(argv)}\n"
                                   f"{logfile.read_text()}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"no socket after 30 s: {' '.join(argv)}")
            time.sleep(0.0005)
        self.ready_ms = (time.monotonic() - t0) * 1000

    def rss(self) -> dict:
        return status_kib(self.proc.pid)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.logfh.close()


class Scale:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.bin = Path(a.bin_dir)
        self.ours = self.bin / "vhost-user-cow"
        self.load = self.bin / "vhost-user-cow-load"
        self.logs = Path(a.output).with_suffix(".logs")
        self.logs.mkdir(parents=True, exist_ok=True)
        self.results: dict = {"empty": [], "written": [], "info": []}

    # ---- files -------------------------------------------------------
    @staticmethod
    def sparse(path: Path, size: int) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        with open(path, "wb") as f:
            f.truncate(size)
        return path

    def overlay(self, who: str, base: Path, path: Path) -> Path:
        path.unlink(missing_ok=True)
        if who == "ours":
            subprocess.run([str(self.ours), "create", str(path), "--backing", str(base)],
                           check=True, stdout=subprocess.DEVNULL)
        else:
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base),
                            "-F", "raw", str(path)], check=True)
        return path

    def start(self, who: str, base: Path, disk: Path, tag: str) -> Daemon:
        sock = disk.with_suffix(".sock")
        logf = self.logs / f"{tag}.{who}.log"
        if who == "ours":
            argv = [str(self.ours), "serve", "--socket-path", str(sock), "--num-queues", "1",
                    "--disk", str(disk), "--format", "cow", "--backing", str(base)]
            argv += self.a.ours_args.split()
        else:
            argv = ["qemu-storage-daemon",
                    "--blockdev", f"driver=file,node-name=b0,filename={base},aio=io_uring,"
                    "read-only=on",
                    "--blockdev", "driver=raw,node-name=braw,file=b0,read-only=on",
                    "--blockdev", f"driver=file,node-name=f0,filename={disk},aio=io_uring",
                    "--blockdev", "driver=qcow2,node-name=d0,file=f0,backing=braw",
                    "--export", "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,"
                    f"addr.path={sock},writable=on,num-queues=1"]
        return Daemon(argv, sock, logf)

    def loadgen(self, sock: Path, *args: str) -> dict:
        argv = [str(self.load), "--socket", str(sock), "--json", "--queues", "1", *args]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
        if p.returncode not in (0, 3) or not p.stdout.strip():
            raise RuntimeError(f"load generator failed: {' '.join(argv)}\n{p.stderr}")
        r = json.loads(p.stdout)
        if r["errors"]:
            raise RuntimeError(f"{' '.join(argv)}: {r['errors']} errors: {r['first_error']}")
        return r

    def write_1g(self, who: str, base: Path, disk: Path, tag: str) -> dict:
        """1 GiB of 64 KiB writes at random offsets, through the daemon."""
        d = self.start(who, base, disk, tag)
        try:
            r = self.loadgen(d.sock, "--pattern", "randwrite", "--bs", "64k", "--iodepth", "16",
                             "--io-limit", str(self.a.written), "--runtime", "3600",
                             "--seed", "7")
            return {"rss": d.rss(), "iops": r.get("iops")}
        finally:
            d.stop()

    # ---- the measurements -------------------------------------------
    def empty(self) -> None:
        shm = Path(self.a.shm_dir)
        for size in self.a.sizes:
            base = self.sparse(shm / f"base-{human(size).replace(' ', '')}.img", size)
            for who in self.whos():
                disk = shm / f"empty.{'cow' if who == 'ours' else 'qcow2'}"
                rows = []
                for rep in range(self.a.reps):
                    self.overlay(who, base, disk)
                    d = self.start(who, base, disk, f"empty-{size}-{rep}")
                    try:
                        time.sleep(0.3)  # its threads up, nothing asked of it yet
                        idle = d.rss()
                        self.loadgen(d.sock, "--pattern", "randread", "--bs", "4k",
                                     "--iodepth", "8", "--runtime", "2")
                        loaded = d.rss()
                    finally:
                        d.stop()
                    rows.append({"ready_ms": d.ready_ms, "idle": idle, "after_reads": loaded})
                disk.unlink(missing_ok=True)
                res = {
                    "who": who, "size": size, "fs": "tmpfs",
                    "ready_ms": statistics.median(r["ready_ms"] for r in rows),
                    "rss_kib": statistics.median(r["idle"]["VmRSS"] for r in rows),
                    "rss_after_reads_kib": statistics.median(
                        r["after_reads"]["VmRSS"] for r in rows),
                    "hwm_after_reads_kib": statistics.median(
                        r["after_reads"]["VmHWM"] for r in rows),
                    "reps": rows,
                }
                log(f"empty {who} {human(size)}: ready {res['ready_ms']:.1f} ms, "
                    f"RSS {res['rss_kib']} KiB, after reads {res['rss_after_reads_kib']} KiB")
                self.results["empty"].append(res)
            base.unlink()

    def written(self) -> None:
        size = self.a.written_size
        work = Path(self.a.disk_dir)
        base = self.sparse(work / "base-written.img", size)
        for who in self.whos():
            disk = self.overlay(who, base, work / f"written.{'cow' if who == 'ours' else 'qcow2'}")
            w = self.write_1g(who, base, disk, "written-fill")
            d = self.start(who, base, disk, "written-read")
            try:
                r = self.loadgen(d.sock, "--pattern", "randread", "--bs", "4k", "--iodepth", "16",
                                 "--runtime", str(self.a.read_seconds))
                after = d.rss()
            finally:
                d.stop()
            res = {"who": who, "size": size, "fs": fs_of(work), "written": self.a.written,
                   "rss_writing_kib": w["rss"]["VmRSS"], "hwm_writing_kib": w["rss"]["VmHWM"],
                   "write_iops": w["iops"], "ready_ms": d.ready_ms,
                   "rss_after_reads_kib": after["VmRSS"], "hwm_after_reads_kib": after["VmHWM"],
                   "read_iops": r.get("iops"), "file_bytes": disk.stat().st_blocks * 512}
            log(f"written {who}: RSS writing {res['rss_writing_kib']} KiB "
                f"(peak {res['hwm_writing_kib']}), after reads {res['rss_after_reads_kib']} KiB "
                f"(peak {res['hwm_after_reads_kib']})")
            self.results["written"].append(res)
            disk.unlink()
        base.unlink()

    def timed(self, argv: list[str]) -> float:
        times = []
        for _ in range(self.a.reps):
            t0 = time.monotonic()
            subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times.append(time.monotonic() - t0)
        return statistics.median(times) * 1000

    def info(self) -> None:
        size = self.a.info_size
        shm = Path(self.a.shm_dir)
        base = self.sparse(shm / "base-info.img", size)
        for who in self.whos():
            disk = shm / f"info.{'cow' if who == 'ours' else 'qcow2'}"
            for state in ("empty", "1G written"):
                self.overlay(who, base, disk)
                if state != "empty":
                    self.write_1g(who, base, disk, "info-fill")
                if who == "ours":
                    info = [str(self.ours), "info", str(disk)]
                    check = [str(self.ours), "check", str(disk)]
                else:
                    info = ["qemu-img", "info", str(disk)]
                    check = ["qemu-img", "check", str(disk)]
                res = {"who": who, "size": size, "fs": "tmpfs", "state": state,
                       "info_ms": self.timed(info), "check_ms": self.timed(check),
                       "file_bytes": disk.stat().st_blocks * 512}
                log(f"info {who} {human(size)} {state}: info {res['info_ms']:.1f} ms, "
                    f"check {res['check_ms']:.1f} ms")
                self.results["info"].append(res)
            disk.unlink()
        base.unlink()

    def whos(self) -> list[str]:
        return ["ours"] if self.a.no_qsd else ["ours", "qsd"]


def fs_of(path: Path) -> str:
    p = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True)
    return p.stdout.strip() or "?"


def markdown(res: dict) -> str:
    lines = []
    if res["empty"]:
        lines += ["| empty overlay (tmpfs) | socket ready | RSS idle | RSS after 2 s of reads |",
                  "|---|---|---|---|"]
        for r in res["empty"]:
            lines.append(f"| {r['who']} {human(r['size'])} | {r['ready_ms']:.1f} ms | "
                         f"{r['rss_kib'] / 1024:.1f} MiB | "
                         f"{r['rss_after_reads_kib'] / 1024:.1f} MiB |")
        lines.append("")
    if res["written"]:
        lines += ["| 1 GiB written at random | RSS at end of writes (peak) | "
                  "RSS after random reads (peak) | overlay on disk |", "|---|---|---|---|"]
        for r in res["written"]:
            lines.append(f"| {r['who']} {human(r['size'])} ({r['fs']}) | "
                         f"{r['rss_writing_kib'] / 1024:.1f} ({r['hwm_writing_kib'] / 1024:.1f}) MiB"
                         f" | {r['rss_after_reads_kib'] / 1024:.1f} "
                         f"({r['hwm_after_reads_kib'] / 1024:.1f}) MiB | "
                         f"{r['file_bytes'] / MiB:.0f} MiB |")
        lines.append("")
    if res["info"]:
        lines += ["| info / check (tmpfs) | info | check |", "|---|---|---|"]
        for r in res["info"]:
            lines.append(f"| {r['who']} {human(r['size'])}, {r['state']} | {r['info_ms']:.0f} ms"
                         f" | {r['check_ms']:.0f} ms |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin-dir", default=str(Path(os.environ.get(
        "CARGO_TARGET_DIR", ROOT / "target")) / "release"))
    p.add_argument("--sizes", nargs="+", type=parse_size,
                   default=[GiB, TiB, 16 * TiB], help="virtual sizes of the empty overlays")
    p.add_argument("--written-size", type=parse_size, default=TiB)
    p.add_argument("--written", type=parse_size, default=GiB, help="bytes written at random")
    p.add_argument("--read-seconds", type=float, default=10)
    p.add_argument("--info-size", type=parse_size, default=16 * TiB)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--shm-dir", default="/dev/shm/vhost-user-cow-scale")
    p.add_argument("--disk-dir", default="/var/tmp/vhost-user-cow-scale")
    p.add_argument("--ours-args", default="", help="extra arguments for vhost-user-cow serve")
    p.add_argument("--only", nargs="+", choices=["empty", "written", "info"],
                   default=["empty", "written", "info"])
    p.add_argument("--no-qsd", action="store_true")
    p.add_argument("--output", default="bench-results/scale.json")
    a = p.parse_args()
    for tool in ("qemu-img", "qemu-storage-daemon"):
        if not a.no_qsd and not shutil.which(tool):
            sys.exit(f"bench_scale.py: {tool} not found (or use --no-qsd)")
    s = Scale(a)
    try:
        for what in a.only:
            getattr(s, what)()
    finally:
        shutil.rmtree(a.shm_dir, ignore_errors=True)
    out = Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(s.results, indent=1))
    print(markdown(s.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
