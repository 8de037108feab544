#!/usr/bin/env python3
"""Benchmark vhost-user-cow against qemu-storage-daemon, with fio as the ceiling.

Every measured run gets a fresh daemon; ours and qsd alternate within each
repetition; medians over the repetitions are reported. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
GiB = 1 << 30

# name -> (load generator pattern, block size, iodepth, fio rw)
PATTERNS = {
    "randread-4k-qd1": ("randread", "4k", 1, "randread"),
    "randread-4k-qd32": ("randread", "4k", 32, "randread"),
    "randwrite-4k-qd32": ("randwrite", "4k", 32, "randwrite"),
    "write-1m-qd4": ("write", "1m", 4, "write"),
    "read-1m-qd4": ("read", "1m", 4, "read"),
    "randrw70-4k-qd32": ("randrw", "4k", 32, "randrw"),
}

# fio patterns that also get a first-write ceiling (a fresh sparse file).
FIRST_WRITE_RW = ("randwrite", "write")

# disk kind -> (description, patterns, peer description)
KINDS = {
    "raw": ("raw image", None, "qsd raw"),
    "fresh": ("fresh COW overlay (first writes)", None, "qsd fresh qcow2 overlay"),
    "full": ("fully allocated COW", None, "qsd fully allocated qcow2"),
    "half": ("half-allocated COW (reads)", ["randread-4k-qd1", "randread-4k-qd32"],
             "qsd half-allocated qcow2"),
}

FULL_PATTERNS = ["randread-4k-qd1", "randread-4k-qd32", "randwrite-4k-qd32", "write-1m-qd4"]


def log(msg: str) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def cpu_times() -> tuple[int, int]:
    """(steal, total) time of all CPUs so far, from /proc/stat, in ticks."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return v[7], sum(v)


def steal_since(t0: tuple[int, int]) -> float:
    """The share of CPU time the hypervisor took since `t0` (steal): a
    run that lost much of it measured the host, not the daemons."""
    steal, total = cpu_times()
    return (steal - t0[0]) / max(1, total - t0[1])


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


def parse_size(s: str) -> int:
    m = re.fullmatch(r"(\d+)([kmgt]?)(i?b)?", s.strip().lower())
    if not m:
        raise argparse.ArgumentTypeError(f"{s!r} is not a size")
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[m.group(2)]


PIN = {"mode": "none"}


def taskset(role: str) -> list[str]:
    """CPU pinning: with --pin split the daemon gets CPU 0 and the clients
    (load generator, fio) the other CPUs, so every run pays the same
    cross-CPU wake-ups (as a VM's vCPU thread kicking a daemon would)."""
    n = os.cpu_count() or 1
    if PIN["mode"] != "split" or n < 2:
        return []
    cpus = "0" if role == "daemon" else f"1-{n - 1}"
    return ["taskset", "-c", cpus]


def warm(*files: Path) -> None:
    """Read files into the page cache, after dropping their clean cached
    pages, so every file's cache is built the same way whatever wrote it
    last: how a file was written or read decides its page-cache folio sizes
    (sequential writes and readahead make large folios), and 4 KiB writes
    into large folios cost ext4 several times more (ext4_block_write_begin).
    With readahead off (POSIX_FADV_RANDOM) the cache is built from small
    folios, as a guest's random I/O would leave it."""
    os.sync()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            fd = fh.fileno()
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            while fh.read(MiB):
                pass


def drop_dirty() -> None:
    """Write back dirty pages so one run's writeback does not land in the next."""
    os.sync()


def make_golden(path: Path, size: int) -> None:
    """A backing image full of random data (not sparse, so reads are real);
    kept when one of that size is there already."""
    if path.exists() and path.stat().st_size == size:
        return
    log(f"creating {path} ({size >> 20} MiB of random data)")
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        left = size
        while left:
            n = min(left, 16 * MiB)
            f.write(os.urandom(n))
            left -= n
    tmp.rename(path)


def ensure_debian_packages(tools: dict[str, str]) -> None:
    """Installs with apt-get the Debian packages (values) of the commands
    (keys) that are missing, as the test command does for its own."""
    missing = sorted({pkg for tool, pkg in tools.items() if not shutil.which(tool)})
    if not missing:
        return
    log(f"installing {' '.join(missing)} (apt-get)")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(sudo + ["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(sudo + ["apt-get", "install", "-y", "-qq"] + missing, check=True, env=env)


def new_overlay(ours: Path, who: str, path: Path, base: Path,
                sector_size: int | None = None) -> Path:
    """A fresh overlay of `base` at `path`: a COW file made by our binary
    (who == "ours"; `sector_size`: the bytes one bitmap bit covers, 512 by
    default) or a qcow2 made by qemu-img."""
    path.unlink(missing_ok=True)
    if who == "ours":
        extra = ["--sector-size", str(sector_size)] if sector_size else []
        run([str(ours), "create", str(path), "--backing", str(base)] + extra,
            stdout=subprocess.DEVNULL)
    else:
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(path)])
    return path


class Workspace:
    """A benchmark's directories and binaries: work files under
    --workdir, results and logs under --output, our binaries in --bin-dir,
    the golden image `golden.img`."""

    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.work = Path(a.workdir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.out = Path(a.output)
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        self.ours = Path(a.bin_dir) / "vhost-user-cow"
        self.load = Path(a.bin_dir) / "vhost-user-cow-load"
        self.base = self.work / "golden.img"

    def make_base(self) -> None:
        make_golden(self.base, self.a.size)


class Daemon:
    """A fresh daemon serving one disk on a socket."""

    def __init__(self, argv: list[str], sock: Path, logfile: Path):
        self.sock = sock
        if sock.exists():
            sock.unlink()
        self.logfile = logfile
        self.logfh = open(logfile, "w")
        self.proc = subprocess.Popen(taskset("daemon") + argv, stdout=self.logfh, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not sock.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited ({self.proc.returncode}): "
                                   f"{' '.join(argv)}\n{logfile.read_text()}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"daemon socket {sock} did not appear")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> dict:
        """SIGTERM; returns exit code and, for ours, the write-path counters."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
            rc = f"killed after SIGTERM timeout (was {rc})"
        self.logfh.close()
        out = {"exit": rc}
        text = self.logfile.read_text(errors="replace")
        m = re.search(r"write path counters: (\{.*\})", text)
        if m:
            out["counters"] = json.loads(m.group(1))
        # Reads issued off the scheduler's lock are counted here, not in
        # the write path's counters.
        m = re.search(r"lock counters: (\{.*\})", text)
        if m:
            out["lock_counters"] = json.loads(m.group(1))
        if rc != 0:
            out["log_tail"] = text[-2000:]
        if self.sock.exists() and rc == 0 and "counters" in out:
            out["socket_left_behind"] = True
        return out


class Bench:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.work = Path(a.workdir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.out = Path(a.output)
        self.out.mkdir(parents=True, exist_ok=True)
        self.ours = Path(a.bin_dir) / "vhost-user-cow"
        self.load = Path(a.bin_dir) / "vhost-user-cow-load"
        self.runs: list[dict] = []
        self.jsonl = open(self.out / "runs.jsonl", "w")
        self.problems: list[str] = []
        self.size = a.size
        self.base = self.work / "base.img"
        self.raw = self.work / "raw.img"

    # ---- images -------------------------------------------------------
    def make_base(self) -> None:
        make_golden(self.base, self.size)

    def make_raw(self) -> None:
        if not (self.raw.exists() and self.raw.stat().st_size == self.size):
            log(f"creating {self.raw}")
            shutil.copyfile(self.base, self.raw)

    def cow_path(self, kind: str) -> Path:
        return self.work / f"{kind}.cow"

    def qcow_path(self, kind: str) -> Path:
        return self.work / f"{kind}.qcow2"

    def new_cow(self, kind: str) -> Path:
        return new_overlay(self.ours, "ours", self.cow_path(kind), self.base)

    def new_qcow(self, kind: str) -> Path:
        return new_overlay(self.ours, "qsd", self.qcow_path(kind), self.base)

    # ---- daemons ------------------------------------------------------
    def start(self, who: str, kind: str, queues: int, tag: str) -> Daemon:
        sock = self.work / f"{who}.sock"
        logf = self.out / "logs" / f"{tag}.{who}.log"
        logf.parent.mkdir(exist_ok=True)
        if who == "ours":
            argv = [str(self.ours), "serve", "--socket-path", str(sock),
                    "--num-queues", str(queues)] + self.a.ours_args.split()
            if kind == "raw":
                argv += ["--disk", str(self.raw), "--format", "raw"]
            else:
                argv += ["--disk", str(self.cow_path(kind)), "--format", "cow",
                         "--backing", str(self.base)]
        else:
            cache = "cache.direct=off"
            if kind == "raw":
                nodes = [f"driver=file,node-name=f0,filename={self.raw},aio=io_uring,{cache}",
                         "driver=raw,node-name=d0,file=f0"]
            else:
                nodes = [
                    f"driver=file,node-name=b0,filename={self.base},aio=io_uring,{cache},"
                    "read-only=on",
                    "driver=raw,node-name=braw,file=b0,read-only=on",
                    f"driver=file,node-name=f0,filename={self.qcow_path(kind)},aio=io_uring,"
                    f"{cache}",
                    "driver=qcow2,node-name=d0,file=f0,backing=braw",
                ]
            argv = ["qemu-storage-daemon"]
            for n in nodes:
                argv += ["--blockdev", n]
            argv += ["--export",
                     "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,"
                     f"addr.path={sock},writable=on,num-queues={queues}"]
            argv += self.a.qsd_args.split()
        return Daemon(argv, sock, logf)

    def files_of(self, who: str, kind: str) -> list[Path]:
        """The files to read into the page cache before a run."""
        if kind == "raw":
            return [self.raw]
        if kind == "fresh":
            # Not the empty overlay: reading a sparse COW file caches its
            # holes (as large folios on ext4), and 4 KiB first writes into
            # those are ~5x slower than into uncached holes.
            return [self.base]
        return [self.base, self.cow_path(kind) if who == "ours" else self.qcow_path(kind)]

    def loadgen(self, sock: Path, pattern: str, queues: int, pid: int | None,
                runtime: float, ramp: float, extra: list[str] | None = None) -> dict:
        pat, bs, qd, _ = PATTERNS[pattern]
        argv = [str(self.load), "--socket", str(sock), "--pattern", pat, "--bs", bs,
                "--iodepth", str(qd), "--queues", str(queues), "--runtime", str(runtime),
                "--ramp", str(ramp), "--json"]
        if pid:
            argv += ["--pid", str(pid)]
        argv += extra or []
        p = subprocess.run(taskset("client") + argv, capture_output=True, text=True,
                           timeout=runtime + ramp + 120)
        if p.returncode not in (0, 3) or not p.stdout.strip():
            raise RuntimeError(f"load generator failed ({p.returncode}): {' '.join(argv)}\n"
                               f"{p.stderr}")
        r = json.loads(p.stdout)
        if r["errors"]:
            self.problems.append(f"{' '.join(argv)}: {r['errors']} I/O errors, first: "
                                 f"{r['first_error']}")
        return r

    def fill(self, who: str, kind: str, fraction: float) -> None:
        """Allocate a COW / qcow2 overlay through its own daemon: sequential
        1M writes for a full fill, 64k writes in random order (each block
        once) for a partial one."""
        d = self.start(who, kind, 1, f"fill-{kind}")
        try:
            if fraction >= 1:
                extra = ["--pattern", "write", "--bs", "1m", "--iodepth", "4", "--once"]
            else:
                extra = ["--pattern", "randwrite", "--bs", "64k", "--iodepth", "16",
                         "--random-map", "--io-limit", str(int(self.size * fraction)),
                         "--seed", "99"]
            argv = [str(self.load), "--socket", str(d.sock), "--runtime", "3600", "--json",
                    "--queues", "1"] + extra
            r = json.loads(subprocess.run(argv, capture_output=True, text=True,
                                          check=True).stdout)
            if r["errors"]:
                raise RuntimeError(f"fill {who} {kind}: {r['first_error']}")
        finally:
            st = d.stop()
            if st["exit"] != 0:
                self.problems.append(f"fill {who} {kind}: daemon exit {st}")
        drop_dirty()

    def integrity(self) -> dict:
        """Data check before measuring: stamped 1 KiB writes in random order
        on 2 queues over a fresh overlay (bitmap bytes shared between
        requests, so bitmap writes wait and merge), then a fresh daemon reads
        everything back and checks every sector's stamp; then `check`."""
        out = {}
        for who in ("ours", "qsd"):
            kind = "verify"
            self.new_cow(kind) if who == "ours" else self.new_qcow(kind)
            steps = [
                ["--pattern", "randwrite", "--bs", "1k", "--iodepth", "32", "--queues", "2",
                 "--random-map", "--once", "--stamp", "4242"],
                ["--pattern", "read", "--bs", "64k", "--iodepth", "8", "--queues", "2",
                 "--once", "--check", "4242"],
                ["--pattern", "randread", "--bs", "4k", "--iodepth", "16", "--queues", "2",
                 "--runtime", "1", "--check", "4242"],
            ]
            res = {"ok": True}
            for i, step in enumerate(steps):
                d = self.start(who, kind, 2, f"verify-{i}")
                try:
                    p = subprocess.run([str(self.load), "--socket", str(d.sock), "--json",
                                        "--runtime", "600"] + step,
                                       capture_output=True, text=True)
                finally:
                    st = d.stop()
                r = json.loads(p.stdout) if p.stdout.strip() else {"errors": -1,
                                                                    "first_error": p.stderr}
                if r["errors"] or st["exit"] != 0:
                    res["ok"] = False
                    msg = f"integrity {who} step {i}: {r.get('first_error')} (daemon {st})"
                    self.problems.append(msg)
                    log(msg)
                if "counters" in st:
                    res[f"counters_{i}"] = st["counters"]
                if "lock_counters" in st:
                    res[f"lock_counters_{i}"] = st["lock_counters"]
            if who == "ours":
                c = subprocess.run([str(self.ours), "check", str(self.cow_path(kind))],
                                   capture_output=True, text=True)
                res["check"] = c.stdout.strip()
                if c.returncode != 0:
                    res["ok"] = False
                    self.problems.append(f"integrity: check: {c.stdout} {c.stderr}")
            log(f"integrity {who}: {'ok' if res['ok'] else 'FAILED'}")
            out[who] = res
            self.cow_path(kind).unlink(missing_ok=True)
            self.qcow_path(kind).unlink(missing_ok=True)
        return out

    def prepare_kind(self, kind: str) -> None:
        """Set up the overlays that persist across runs (full, half)."""
        if kind in ("full", "half"):
            frac = 1.0 if kind == "full" else 0.5
            for who in ("ours", "qsd"):
                log(f"preparing {kind} overlay for {who}")
                self.new_cow(kind) if who == "ours" else self.new_qcow(kind)
                self.fill(who, kind, frac)

    def one(self, who: str, kind: str, pattern: str, queues: int, rep: int) -> dict:
        tag = f"{kind}-{pattern}-q{queues}-r{rep}"
        extra: list[str] = []
        ramp = self.a.ramp
        runtime = self.a.runtime
        if kind == "fresh":
            # A fresh overlay per run; each block written at most once, so
            # every write is a first write: the run ends at the runtime or
            # when the disk has been covered, whichever is first.
            self.new_cow(kind) if who == "ours" else self.new_qcow(kind)
            pat = PATTERNS[pattern][0]
            if pat in ("randwrite", "randrw"):
                extra += ["--random-map", "--once"]
            elif pat in ("write", "read"):
                extra += ["--once"]
            ramp = 0
        extra += ["--seed", str(rep + 1)]
        drop_dirty()
        warm(*self.files_of(who, kind))
        la = loadavg()
        t0 = cpu_times()
        d = self.start(who, kind, queues, tag)
        try:
            r = self.loadgen(d.sock, pattern, queues, d.pid, runtime, ramp, extra)
        finally:
            st = d.stop()
        steal = steal_since(t0)
        if st["exit"] != 0:
            self.problems.append(f"{tag} {who}: daemon exit {st['exit']}: "
                                 f"{st.get('log_tail', '')[-500:]}")
        rec = {"who": who, "kind": kind, "pattern": pattern, "queues": queues, "rep": rep,
               "loadavg": la, "steal": steal, "result": r, "daemon_exit": st}
        self.record(rec)
        d_ = r.get("daemon") or {}
        log(f"{tag:32} {who:5} {r['iops']:>10.0f} IOPS {r['mb_s']:>8.1f} MB/s "
            f"p50 {((r.get('lat_us') or {}).get('p50') or 0):>8.1f} us "
            f"cpu/io {d_.get('cpu_us_per_io', 0):6.2f} us  load {la[0]:.2f}  steal {steal:.0%}")
        return rec

    def fio(self, pattern: str, queues: int, rep: int, first_writes: bool = False) -> dict:
        """fio on the raw image (the ceiling); with `first_writes`, on a new
        sparse file instead, every block written once (the ceiling of first
        writes into a fresh overlay: the kernel allocates every block)."""
        pat, bs, qd, rw = PATTERNS[pattern]
        kind = "fresh" if first_writes else "raw"
        tag = f"fio-{kind}-{pattern}-q{queues}-r{rep}"
        drop_dirty()
        target = self.raw
        if first_writes:
            target = self.work / "fio-fresh.img"
            target.unlink(missing_ok=True)
            with open(target, "wb") as f:
                f.truncate(self.size)
        else:
            warm(self.raw)
        la = loadavg()
        t0 = cpu_times()
        # --invalidate=0: fio would otherwise drop the file's page cache.
        argv = taskset("client") + ["fio", "--name=ceiling", "--invalidate=0", f"--filename={target}", "--ioengine=io_uring",
                "--direct=0", f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}",
                f"--numjobs={queues}", f"--size={self.size}", "--group_reporting",
                "--output-format=json", f"--randseed={rep + 1}", "--thread"]
        if rw in ("randrw",):
            argv.append("--rwmixread=70")
        if (rw in ("write", "read") or first_writes) and queues > 1:
            # Each job its own slice (first writes: no block written twice).
            argv += [f"--size={self.size // queues}", f"--offset_increment={self.size // queues}"]
        if first_writes:
            # Like the fresh runs: stop at the run time or once every block
            # was written (fio's random map visits each block once).
            argv += [f"--runtime={self.a.runtime}s"]
        else:
            argv += ["--time_based", f"--runtime={self.a.runtime}s", f"--ramp_time={self.a.ramp}s"]
        p = subprocess.run(argv, capture_output=True, text=True, check=True)
        j = json.loads(p.stdout[p.stdout.index("{"):])
        job = j["jobs"][0]
        ios = sum(job[d]["total_ios"] for d in ("read", "write"))
        iops = sum(job[d]["iops"] for d in ("read", "write"))
        bw = sum(job[d]["bw_bytes"] for d in ("read", "write"))
        # fio reports completion latency percentiles; choose the busier side.
        side = "read" if job["read"]["total_ios"] >= job["write"]["total_ios"] else "write"
        pct = job[side]["clat_ns"].get("percentile", {})
        runtime_s = max(job["read"]["runtime"], job["write"]["runtime"]) / 1000
        cpu_s = (job["usr_cpu"] + job["sys_cpu"]) / 100 * runtime_s
        r = {"iops": iops, "mb_s": bw / 1e6, "ios": ios, "runtime_s": runtime_s,
             "lat_us": {"p50": pct.get("50.000000", 0) / 1000,
                        "p99": pct.get("99.000000", 0) / 1000,
                        "p999": pct.get("99.900000", 0) / 1000},
             "cpu_us_per_io": cpu_s * 1e6 / ios if ios else 0}
        rec = {"who": "fio", "kind": kind, "pattern": pattern, "queues": queues, "rep": rep,
               "loadavg": la, "steal": steal_since(t0), "result": r}
        self.record(rec)
        if first_writes:
            target.unlink(missing_ok=True)
        log(f"{tag:32} fio   {iops:>10.0f} IOPS {bw / 1e6:>8.1f} MB/s "
            f"p50 {r['lat_us']['p50']:>8.1f} us  load {la[0]:.2f}  steal {rec['steal']:.0%}")
        return rec

    def record(self, rec: dict) -> None:
        self.runs.append(rec)
        self.jsonl.write(json.dumps(rec) + "\n")
        self.jsonl.flush()

    # ---- the matrix ---------------------------------------------------
    def matrix(self) -> list[tuple[str, str, int]]:
        rows = []
        for kind in self.a.kinds:
            pats = KINDS[kind][1] or self.a.patterns
            for pattern in self.a.patterns:
                if pattern not in pats:
                    continue
                for q in self.a.queues:
                    rows.append((kind, pattern, q))
        return rows

    def go(self) -> dict:
        started = time.time()
        load_start = loadavg()
        self.make_base()
        self.make_raw()
        rows = self.matrix()
        integrity = None if self.a.no_verify else self.integrity()
        for kind in self.a.kinds:
            self.prepare_kind(kind)
            for (k, pattern, q) in rows:
                if k != kind:
                    continue
                for rep in range(self.a.reps):
                    order = ("ours", "qsd") if rep % 2 == 0 else ("qsd", "ours")
                    for who in order:
                        self.one(who, kind, pattern, q, rep)
        if not self.a.no_fio:
            for pattern in self.a.patterns:
                for q in self.a.queues:
                    for rep in range(self.a.reps):
                        self.fio(pattern, q, rep)
                        if "fresh" in self.a.kinds and PATTERNS[pattern][3] in FIRST_WRITE_RW:
                            self.fio(pattern, q, rep, first_writes=True)
        meta = {
            "date": dt.datetime.now().isoformat(timespec="seconds"),
            "host": platform.node(), "kernel": platform.release(),
            "cpus": os.cpu_count(), "size": self.size, "reps": self.a.reps,
            "runtime_s": self.a.runtime, "ramp_s": self.a.ramp, "quick": self.a.quick,
            "loadavg_start": load_start, "loadavg_end": loadavg(),
            "wall_s": round(time.time() - started, 1),
            "qsd_version": subprocess.run(["qemu-storage-daemon", "--version"],
                                          capture_output=True, text=True).stdout.split("\n")[0],
            "fio_version": subprocess.run(["fio", "--version"], capture_output=True,
                                          text=True).stdout.strip(),
            "pin": self.a.pin, "ours_args": self.a.ours_args, "qsd_args": self.a.qsd_args,
            "git": subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                                  capture_output=True, text=True).stdout.strip(),
        }
        steals = [rec["steal"] for rec in self.runs if rec.get("steal") is not None]
        meta["steal_median"] = med(steals)
        meta["steal_max"] = max(steals, default=None)
        summary = summarise(self.runs, meta, self.problems)
        summary["integrity"] = integrity
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        md = markdown(summary)
        (self.out / "results.md").write_text(md)
        print(md)
        if not self.a.no_chart:
            try:
                chart(summary, self.out / "chart.png")
            except Exception as e:  # the numbers matter more than the picture
                log(f"chart failed: {e}")
        log(f"results in {self.out}")
        return summary


def med(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def pick(rec: dict) -> dict:
    r = rec["result"]
    d = r.get("daemon") or {}
    end = d.get("end") or {}
    lat = r.get("lat_us") or {}
    return {"iops": r["iops"], "mb_s": r["mb_s"], "p50": lat.get("p50"), "p99": lat.get("p99"),
            "p999": lat.get("p999"),
            "cpu_us_per_io": d.get("cpu_us_per_io", r.get("cpu_us_per_io")),
            "cpu_util": d.get("cpu_util"), "rss_kib": end.get("vm_rss_kib"),
            "hwm_kib": end.get("vm_hwm_kib"), "anon_kib": end.get("rss_anon_kib"),
            "runtime_s": r.get("runtime_s"), "loadavg": rec["loadavg"][0],
            "steal": rec.get("steal")}


def summarise(runs: list[dict], meta: dict, problems: list[str]) -> dict:
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for rec in runs:
        key = (rec["kind"], rec["pattern"], rec["queues"])
        groups.setdefault(key, {}).setdefault(rec["who"], []).append(pick(rec))
    rows = []
    fio = {k: v["fio"] for k, v in groups.items() if "fio" in v}
    for key, by in groups.items():
        if set(by) == {"fio"}:
            continue
        row = {"kind": key[0], "pattern": key[1], "queues": key[2]}
        for who in ("ours", "qsd"):
            samples = by.get(who, [])
            row[who] = {f: med([s[f] for s in samples]) for f in samples[0]} if samples else None
            if samples:
                row[who]["n"] = len(samples)
                row[who]["iops_all"] = [round(s["iops"]) for s in samples]
        # Fresh writes against fio's first writes where it ran them.
        f = fio.get(key) or fio.get(("raw", key[1], key[2]))
        row["fio"] = {k: med([s[k] for s in f]) for k in ("iops", "mb_s", "p50", "p99",
                                                          "cpu_us_per_io")} if f else None
        f_raw = fio.get(("raw", key[1], key[2]))
        row["fio_first_writes"] = key[0] != "raw" and key in fio
        row["fio_vs_fio_raw"] = (med([s["iops"] for s in f]) / med([s["iops"] for s in f_raw])
                                 if f and f_raw and row["fio_first_writes"] else None)
        o, q = row["ours"], row["qsd"]

        def ratio(a, b):
            return a / b if a is not None and b else None
        row["ratio"] = {
            "iops": ratio(o and o["iops"], q and q["iops"]),
            "p50": ratio(o and o["p50"], q and q["p50"]),
            "p99": ratio(o and o["p99"], q and q["p99"]),
            "cpu_us_per_io": ratio(o and o["cpu_us_per_io"], q and q["cpu_us_per_io"]),
            "hwm": ratio(o and o["hwm_kib"], q and q["hwm_kib"]),
            "vs_fio": ratio(o and o["iops"], row["fio"] and row["fio"]["iops"]),
        }
        rows.append(row)
    # COW vs our raw.
    raw = {(r["pattern"], r["queues"]): r for r in rows if r["kind"] == "raw"}
    for r in rows:
        base = raw.get((r["pattern"], r["queues"]))
        if r["kind"] != "raw" and base and base["ours"] and r["ours"]:
            r["ratio"]["vs_our_raw"] = r["ours"]["iops"] / base["ours"]["iops"]
    order = {k: i for i, k in enumerate(KINDS)}
    porder = {k: i for i, k in enumerate(PATTERNS)}
    rows.sort(key=lambda r: (order[r["kind"]], porder[r["pattern"]], r["queues"]))
    return {"meta": meta, "rows": rows, "problems": problems}


def fmt(x, spec=".0f", none="–"):
    return none if x is None else format(x, spec)


def markdown(s: dict) -> str:
    m = s["meta"]
    out = [f"# vhost-user-cow vs qemu-storage-daemon ({m['date']})", "",
           f"{m['size'] >> 20} MiB disks, {m['reps']} repetitions (medians), "
           f"{m['runtime_s']} s runs after {m['ramp_s']} s ramp, {m['cpus']} CPUs, "
           f"CPU pinning {m.get('pin')}, kernel {m['kernel']}, {m['qsd_version']}, {m['fio_version']}, git {m['git']}. "
           f"Load average at start {m['loadavg_start']}, at end {m['loadavg_end']}; "
           + (f"CPU time taken by the hypervisor (steal) per run: median "
              f"{m['steal_median']:.0%}, at most {m['steal_max']:.0%}; "
              if m.get("steal_max") is not None else "") +
           f"wall {m['wall_s']} s." + (" QUICK MODE: smoke test, not a measurement." if
                                       m["quick"] else ""), "",
           "Ratios are ours / qsd: **IOPS ×** higher is better; **p50 ×**, **CPU ×** "
           "(daemon CPU time per I/O) and **RSS ×** (peak VmHWM) lower is better. "
           "*vs raw* is our IOPS on this disk / our IOPS on the raw image; *vs fio* is our "
           "IOPS / fio's on the raw file from the host (the ceiling); on the fresh rows "
           "that write, fio's first writes into a new sparse file instead (marked ¹).", "",
           "| disk | pattern | q | ours IOPS | qsd IOPS | IOPS × | ours MB/s | ours p50/p99 µs "
           "| qsd p50/p99 µs | p50 × | ours CPU µs/IO | qsd CPU µs/IO | CPU × | ours/qsd RSS "
           "MiB | RSS × | fio IOPS | vs fio | vs raw |",
           "|" + "---|" * 18]
    for r in s["rows"]:
        o, q, f, x = r["ours"] or {}, r["qsd"] or {}, r["fio"] or {}, r["ratio"]

        def mib(v):
            return fmt(v and v / 1024, ".1f")
        out.append(
            f"| {r['kind']} | {r['pattern']} | {r['queues']} | {fmt(o.get('iops'))} | "
            f"{fmt(q.get('iops'))} | **{fmt(x['iops'], '.2f')}** | {fmt(o.get('mb_s'), '.0f')} | "
            f"{fmt(o.get('p50'), '.1f')}/{fmt(o.get('p99'), '.0f')} | "
            f"{fmt(q.get('p50'), '.1f')}/{fmt(q.get('p99'), '.0f')} | {fmt(x['p50'], '.2f')} | "
            f"{fmt(o.get('cpu_us_per_io'), '.2f')} | {fmt(q.get('cpu_us_per_io'), '.2f')} | "
            f"{fmt(x['cpu_us_per_io'], '.2f')} | {mib(o.get('hwm_kib'))}/{mib(q.get('hwm_kib'))} | "
            f"{fmt(x['hwm'], '.2f')} | {fmt(f.get('iops'))}{'¹' if r.get('fio_first_writes') else ''} | "
            f"{fmt(x['vs_fio'], '.2f')} | {fmt(x.get('vs_our_raw'), '.2f')} |")
    floor = [r for r in s["rows"] if r.get("fio_vs_fio_raw")]
    if floor:
        out += ["", "¹ fio on a new sparse file, every block written once (the first-write "
                "ceiling: the file system allocates each block). Its IOPS / fio's on the raw "
                "file, the kernel's own first-write ratio to compare *vs raw* with: " + ", ".join(
                    f"{r['pattern']} q{r['queues']} {r['fio_vs_fio_raw']:.2f}" for r in floor)
                + "."]
    short = [r for r in s["rows"] if r["kind"] == "fresh" and r["ours"]
             and r["ours"]["runtime_s"] and r["ours"]["runtime_s"] < m["runtime_s"] * 0.99]
    if short:
        out += ["", "Fresh-overlay runs stop when every block has been written once "
                "(so each write is a first write); measured seconds (ours/qsd): " + ", ".join(
                    f"{r['pattern']} q{r['queues']} {r['ours']['runtime_s']:.2f}/"
                    f"{fmt(r['qsd'] and r['qsd']['runtime_s'], '.2f')}" for r in short) + "."]
    if s.get("integrity"):
        out += ["", "Data check (stamped 1 KiB random first writes on 2 queues, read back "
                "by a fresh daemon): " + ", ".join(
                    f"{w} {'ok' if v['ok'] else 'FAILED'}" for w, v in s["integrity"].items())
                + "."]
    if s["problems"]:
        out += ["", "## Problems seen", ""] + [f"- {p}" for p in s["problems"]]
    return "\n".join(out) + "\n"


def ensure_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log("installing matplotlib (pip)")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"], check=True)


def chart(s: dict, path: Path) -> None:
    ensure_matplotlib()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in s["rows"] if r["ratio"]["iops"]]
    labels = [f"{r['kind']} {r['pattern']} q{r['queues']}" for r in rows]
    series = [("IOPS × (higher better)", "iops"), ("p50 × (lower better)", "p50"),
              ("CPU/IO × (lower better)", "cpu_us_per_io")]
    fig, ax = plt.subplots(figsize=(max(8, 0.55 * len(rows) + 3), 5.5))
    w = 0.27
    for i, (name, key) in enumerate(series):
        vals = [r["ratio"][key] or 0 for r in rows]
        ax.bar([j + (i - 1) * w for j in range(len(rows))], vals, w, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("ours / qemu-storage-daemon")
    m = s["meta"]
    ax.set_title(f"vhost-user-cow vs qsd, {m['size'] >> 20} MiB, medians of {m['reps']}"
                 + (" (quick)" if m["quick"] else ""))
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: small disk, 1 queue, 1 repetition, 1 s runs")
    p.add_argument("--size", type=parse_size, help="disk size (default 1G; quick 128M)")
    p.add_argument("--reps", type=int, help="repetitions (default 3; quick 1)")
    p.add_argument("--runtime", type=float, help="seconds per run (default 5; quick 1)")
    p.add_argument("--ramp", type=float, help="warm-up seconds (default 1; quick 0.2)")
    p.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS))
    p.add_argument("--patterns", nargs="+", choices=list(PATTERNS), default=FULL_PATTERNS)
    p.add_argument("--queues", nargs="+", type=int, help="queue counts (default 1 2; quick 1)")
    p.add_argument("--workdir", default="/var/tmp/vhost-user-cow-bench",
                   help="where the images live (a real disk, not tmpfs)")
    p.add_argument("--output", help="results directory (default bench-results/DATE)")
    p.add_argument("--bin-dir", help="where vhost-user-cow and vhost-user-cow-load are "
                   "(default: build them with cargo --release)")
    p.add_argument("--ours-args", default="", help="extra arguments for vhost-user-cow serve")
    p.add_argument("--qsd-args", default="", help="extra arguments for qemu-storage-daemon")
    p.add_argument("--pin", choices=["split", "none"], default="split",
                   help="split: daemon on CPU 0, load generator / fio on the others "
                   "(default); none: let the scheduler place them")
    p.add_argument("--no-fio", action="store_true", help="skip the fio ceiling")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the data check that runs before measuring")
    p.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    a = p.parse_args()
    q = a.quick
    a.size = a.size or (128 * MiB if q else GiB)
    a.reps = a.reps or (1 if q else 3)
    a.runtime = a.runtime if a.runtime is not None else (1.0 if q else 5.0)
    a.ramp = a.ramp if a.ramp is not None else (0.2 if q else 1.0)
    a.queues = a.queues or ([1] if q else [1, 2])
    if a.size % MiB:
        p.error("--size must be a multiple of 1 MiB")
    a.output = a.output or str(ROOT / "bench-results" /
                               (dt.datetime.now().strftime("%Y%m%d-%H%M%S") +
                                ("-quick" if q else "")))
    if not a.no_fio:
        ensure_debian_packages({"fio": "fio"})
    for tool in ("qemu-storage-daemon", "qemu-img"):
        if not shutil.which(tool):
            p.error(f"{tool} is not installed (scripts/qemu/setup.sh installs QEMU 10)")
    if not a.bin_dir:
        target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
        log("building release binaries")
        # The daemon and the load generator are two packages of the workspace.
        run(["cargo", "build", "--release", "--quiet",
             "-p", "vhost-user-cow", "--bin", "vhost-user-cow",
             "-p", "vhost-user-cow-load", "--bin", "vhost-user-cow-load"], cwd=ROOT)
        a.bin_dir = str(target / "release")
    PIN["mode"] = a.pin
    summary = Bench(a).go()
    return 1 if summary["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
