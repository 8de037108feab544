#!/usr/bin/env python3
"""Instructions per request of the daemon, counted by callgrind.

A benchmark, not a test: instruction counts are repeatable on a noisy
machine where IOPS are not, so they show what a change did to the
daemon's own (user-space) work per request. For each row the daemon runs
under `valgrind --tool=callgrind` twice, serving N and 2N requests from
its own load generator, and Ir/request = (Ir(2N) - Ir(N)) / N, which
removes start-up, connection set-up and shutdown. The kernel's side of
the I/O is not counted.

  scripts/callgrind_requests.py --build base=/path/bin --build new=target/release a b c
  scripts/callgrind_requests.py --build new=target/release --functions a

Rows: a raw 4 KiB random reads QD32, b raw random writes QD32, c first
writes into a fresh COW QD32 (every write a first write), d reads of a
fully allocated COW QD32, e raw random reads QD1. Files live in
/dev/shm/vuc-callgrind (tmpfs: always cached, the same for every build).
"""

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
from collections import defaultdict
from pathlib import Path

WORK = Path("/dev/shm/vuc-callgrind")
# row -> (disk, load pattern, iodepth, extra load flags)
ROWS = {
    "a": ("raw", "randread", 32, []),
    "b": ("raw", "randwrite", 32, []),
    "c": ("fresh", "randwrite", 32, ["--random-map", "--once"]),
    "d": ("full", "randread", 32, []),
    "e": ("raw", "randread", 1, []),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(*argv, **kw):
    return subprocess.run([str(a) for a in argv], check=True, **kw)


def warm(path: Path) -> None:
    """Drop and re-read a file's cache with readahead off, as bench.py does."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        while os.read(fd, 1 << 20):
            pass
    finally:
        os.close(fd)


def wait_for(path: Path, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    end = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            sys.exit(f"{what} exited with {proc.returncode} before {path} appeared")
        if time.time() > end:
            proc.kill()
            sys.exit(f"{what}: {path} did not appear within {timeout:.0f} s")
        time.sleep(0.05)


def setup(bin_dir: Path) -> None:
    """The backing image, a raw copy and a fully written COW file, once."""
    WORK.mkdir(exist_ok=True)
    base, raw, full = WORK / "base.img", WORK / "raw.img", WORK / "full.cow"
    if not base.exists():
        log("creating the 256 MiB backing image")
        with open(base, "wb") as f:
            for _ in range(256):
                f.write(os.urandom(1 << 20))
        shutil.copy(base, raw)
    if not full.exists():
        log("filling full.cow")
        run(bin_dir / "vhost-user-cow", "create", full, "--backing", base)
        sock = WORK / "fill.sock"
        sock.unlink(missing_ok=True)
        d = subprocess.Popen([bin_dir / "vhost-user-cow", "serve", "--socket-path", sock,
                              "--disk", full, "--backing", base, "--format", "cow"])
        try:
            wait_for(sock, d, "the daemon filling full.cow")
            run(bin_dir / "vhost-user-cow-load", "--socket", sock, "--pattern", "write",
                "--bs", "1m", "--iodepth", "4", "--once", "--runtime", "600",
                stdout=subprocess.DEVNULL)
        finally:
            d.send_signal(signal.SIGTERM)
            d.wait(timeout=60)


def one(bin_dir: Path, tag: str, row: str, n: int, seed: int) -> tuple[Path, dict]:
    """One daemon under callgrind serving n requests of `row`."""
    disk, pattern, qd, flags = ROWS[row]
    sock = WORK / f"{tag}.sock"
    out = WORK / f"{tag}-{row}-{n}-{seed}.cg"
    sock.unlink(missing_ok=True)
    base = WORK / "base.img"
    if disk == "raw":
        args, cached = ["--disk", WORK / "raw.img", "--format", "raw"], [WORK / "raw.img"]
    elif disk == "full":
        args = ["--disk", WORK / "full.cow", "--backing", base, "--format", "cow"]
        cached = [WORK / "full.cow", base]
    else:
        fresh = WORK / "fresh.cow"
        fresh.unlink(missing_ok=True)
        run(bin_dir / "vhost-user-cow", "create", fresh, "--backing", base)
        args, cached = ["--disk", fresh, "--backing", base, "--format", "cow"], [base]
    run("sync")
    for f in cached:
        warm(f)
    # No seccomp filter nor sandbox: valgrind cannot run under them. Both
    # act once at start-up and add no user-space instructions per request.
    d = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                          bin_dir / "vhost-user-cow", "serve", "--socket-path", sock,
                          "--num-queues", "1", "--poll-us", "0", "--seccomp", "off",
                          "--sandbox", "none", *args],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(sock, d, "the daemon under valgrind")
        r = run(bin_dir / "vhost-user-cow-load", "--socket", sock, "--pattern", pattern,
                "--bs", "4k", "--iodepth", str(qd), "--queues", "1", "--runtime", "600",
                "--io-limit", str(n * 4096), "--seed", str(seed), "--json", *flags,
                capture_output=True, text=True, timeout=900)
    finally:
        d.send_signal(signal.SIGTERM)
        d.wait(timeout=300)
    report = json.loads(r.stdout)
    if report.get("errors"):
        sys.exit(f"{tag} row {row}: the load generator saw errors: {report.get('first_error')}")
    return out, report


def total_ir(cg: Path) -> int:
    for line in cg.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    sys.exit(f"{cg}: no summary line")


def self_cost(cg: Path) -> dict[tuple[str, str], int]:
    """Self Ir per (source file, function): callgrind_annotate attributes
    inlined code to the file it came from, which says whose code ran."""
    out = subprocess.run(["callgrind_annotate", "--inclusive=no", "--auto=no",
                          "--threshold=100", str(cg)],
                         capture_output=True, text=True, check=True).stdout
    per: dict[tuple[str, str], int] = defaultdict(int)
    for line in out.splitlines():
        m = re.match(r"^\s*([\d,]+) \([ \d.]+%\)\s+(\S+?):(.+?)(?: \[.*\])?$", line)
        if m and "=>" not in line:
            per[(m.group(2), m.group(3).strip())] += int(m.group(1).replace(",", ""))
    return per


OURS = (("virtio", "ours: virtio/ (request parsing)"),
        ("daemon", "ours: daemon/ (worker, scheduler, rings)"),
        ("io_engine", "ours: io_engine/"), ("format", "ours: format/ (bitmap)"),
        ("fsutil", "ours: fsutil/"))
CRATES = {"vm_memory": "vm-memory (guest address translation, copies)",
          "virtio_queue": "virtio-queue (rings, descriptor walk)",
          "smallvec": "smallvec", "io_uring": "io-uring crate", "slab": "slab",
          "hashbrown": "hashbrown", "std": "std", "core": "core", "alloc": "alloc"}


def component(path: str, function: str) -> str:
    """Whose code ran: the source file's crate or module, or, for code of
    the standard library inlined into a function, that function's."""
    if "malloc" in path or "/malloc/" in path:
        return "libc malloc/free"
    if "memmove" in path or "memcpy" in path or "memset" in path:
        return "libc memcpy/memset"
    for key, name in (("vm-memory", "vm_memory"), ("virtio-queue", "virtio_queue"),
                      ("smallvec", "smallvec"), ("io-uring", "io_uring"), ("/slab-", "slab"),
                      ("hashbrown", "hashbrown")):
        if key in path:
            return CRATES[name]
    for module, name in OURS:
        if f"src/{module}/" in path:
            return name
    # Inlined standard-library code: the function it was inlined into.
    words = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", function)
    for i, w in enumerate(words):
        if w == "vhost_user_cow" and i + 1 < len(words):
            for module, name in OURS:
                if words[i + 1] == module:
                    return name
        if w in CRATES and w not in ("std", "core", "alloc"):
            return CRATES[w]
    return "other (std, libc, the loop)"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("rows", nargs="+", choices=list(ROWS))
    p.add_argument("--build", action="append", required=True, metavar="NAME=BIN_DIR",
                   help="a build: a name and the directory holding its vhost-user-cow and "
                        "vhost-user-cow-load (repeat to compare builds)")
    p.add_argument("--n", type=int, default=30000, help="requests of the shorter run")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--functions", action="store_true",
                   help="also show where the instructions go: self Ir per request by whose "
                        "code ran, and the top functions")
    a = p.parse_args()
    if not shutil.which("valgrind"):
        p.error("valgrind is not installed (apt-get install valgrind)")
    builds = []
    for b in a.build:
        name, _, path = b.partition("=")
        builds.append((name, Path(path)))
    setup(builds[0][1])
    results: dict[tuple[str, str], list[float]] = defaultdict(list)
    for row in a.rows:
        for rep in range(a.reps):
            # Alternate the builds' order between repetitions.
            order = builds if rep % 2 == 0 else list(reversed(builds))
            for name, bin_dir in order:
                cg1, r1 = one(bin_dir, name, row, a.n, rep)
                cg2, r2 = one(bin_dir, name, row, 2 * a.n, rep)
                ios = r2["ios"] - r1["ios"]
                ir = (total_ir(cg2) - total_ir(cg1)) / ios
                results[(row, name)].append(ir)
                log(f"{name} row {row} rep {rep}: {ir:.0f} Ir/request")
                if a.functions and rep == 0:
                    f1, f2 = self_cost(cg1), self_cost(cg2)
                    diff = {k: (f2[k] - f1.get(k, 0)) / ios for k in f2}
                    groups: dict[str, float] = defaultdict(float)
                    for (path, fn), v in diff.items():
                        groups[component(path, fn)] += v
                    print(f"\n{name} row {row}, self Ir per request by whose code ran:")
                    for k, v in sorted(groups.items(), key=lambda kv: -kv[1]):
                        print(f"  {v:8.0f}  {k}")
                    byfn: dict[str, float] = defaultdict(float)
                    for (_, fn), v in diff.items():
                        byfn[fn] += v
                    print(f"{name} row {row}, the functions with the most self Ir per request:")
                    for k, v in sorted(byfn.items(), key=lambda kv: -kv[1])[:20]:
                        print(f"  {v:8.0f}  {k[:140]}")
    names = [n for n, _ in builds]
    print("\n| row | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for row in a.rows:
        cells = []
        for n in names:
            v = results[(row, n)]
            cells.append(f"{statistics.median(v):.0f}" + (f" [{min(v):.0f}-{max(v):.0f}]"
                                                          if len(v) > 1 else ""))
        print(f"| {row} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
