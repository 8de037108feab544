#!/usr/bin/env python3
"""Many VMs on one golden image: N daemons, each serving its own fresh COW
overlay of the same backing image under a 70/30 random read/write load,
and one daemon serving all N (serve --export), against
qemu-storage-daemon serving N qcow2 overlays of it (one process with N
exports, and N processes).

Reports per-daemon memory as PSS (/proc/PID/smaps_rollup: shared pages are
divided among the processes sharing them, so the binary and libraries
count once in the total), aggregate IOPS, and the page cache the backing
image and the overlays hold (fincore). A benchmark, run on demand; see
docs/benchmarks.md ("Many VMs on one golden image").

    scripts/density.py [--n 8 32] [--size 1G] [--runtime 10] [--sector-sizes 512 4096]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the shared daemon, image and build helpers)

MiB = 1 << 20


def rollup_kib(pid: int, field: str) -> int:
    """A field of /proc/PID/smaps_rollup, in KiB."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/smaps_rollup")


def pss_kib(pid: int) -> int:
    """Proportional set size of a process, in KiB."""
    return rollup_kib(pid, "Pss")


def anon_kib(pid: int) -> int:
    """The process's own memory: PSS without the shared files (whose
    share moves with whatever else maps them, the load generators'
    libc included)."""
    return rollup_kib(pid, "Pss_Anon")


def cached_bytes(*files: Path) -> int:
    """Page-cache bytes of the files (fincore)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES"]
                         + [str(f) for f in files],
                         capture_output=True, text=True, check=True).stdout
    return sum(int(x) for x in out.split())


class Density(bench.Workspace):
    def overlay(self, who: str, i: int) -> Path:
        return self.work / (f"vm{i}.cow" if who == "ours" else f"vm{i}.qcow2")

    def new_overlays(self, who: str, n: int, sector_size: int | None = None) -> list[Path]:
        return [bench.new_overlay(self.ours, who, self.overlay(who, i), self.base, sector_size)
                for i in range(n)]

    def sock(self, who: str, i: int) -> Path:
        return self.work / f"{who}-{i}.sock"

    def start_ours(self, i: int) -> bench.Daemon:
        argv = [str(self.ours), "serve", "--socket-path", str(self.sock("ours", i)),
                "--num-queues", "1", "--disk", str(self.overlay("ours", i)), "--format", "cow",
                "--backing", str(self.base)] + self.a.ours_args.split()
        return bench.Daemon(argv, self.sock("ours", i), self.out / "logs" / f"ours-{i}.log")

    @staticmethod
    def qsd_nodes(base: Path, overlays: list[tuple[int, Path]]) -> list[str]:
        argv = ["--blockdev", f"driver=file,node-name=b0,filename={base},aio=io_uring,"
                "cache.direct=off,read-only=on",
                "--blockdev", "driver=raw,node-name=braw,file=b0,read-only=on"]
        for i, p in overlays:
            argv += ["--blockdev", f"driver=file,node-name=f{i},filename={p},aio=io_uring,"
                     "cache.direct=off",
                     "--blockdev", f"driver=qcow2,node-name=d{i},file=f{i},backing=braw"]
        return argv

    def start_qsd(self, indices: list[int], tag: str) -> subprocess.Popen:
        """One qemu-storage-daemon exporting the overlays of `indices`
        (none: only the backing image's nodes, for PSS_0)."""
        argv = ["qemu-storage-daemon"] + self.qsd_nodes(
            self.base, [(i, self.overlay("qsd", i)) for i in indices])
        for i in indices:
            s = self.sock("qsd", i)
            s.unlink(missing_ok=True)
            argv += ["--export", f"type=vhost-user-blk,id=e{i},node-name=d{i},addr.type=unix,"
                     f"addr.path={s},writable=on,num-queues=1"]
        logf = open(self.out / "logs" / f"qsd-{tag}.log", "w")
        p = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not all(self.sock("qsd", i).exists() for i in indices):
            if p.poll() is not None or time.monotonic() > deadline:
                p.kill()
                raise RuntimeError(f"qemu-storage-daemon did not start: {' '.join(argv)}")
            time.sleep(0.02)
        if not indices:
            time.sleep(0.5)  # let it finish starting before PSS_0 is read
        return p

    def loads(self, socks: list[Path], seed0: int) -> tuple[list[subprocess.Popen], float]:
        procs = []
        for k, s in enumerate(socks):
            argv = [str(self.load), "--socket", str(s), "--pattern", "randrw",
                    "--rwmixread", "70", "--bs", "4k", "--iodepth", str(self.a.iodepth),
                    "--queues", "1", "--runtime", str(self.a.runtime), "--ramp",
                    str(self.a.ramp), "--seed", str(seed0 + k), "--json"]
            procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
        return procs, time.monotonic()

    def finish(self, procs: list[subprocess.Popen]) -> tuple[float, int]:
        iops, errors = 0.0, 0
        for p in procs:
            out, err = p.communicate(timeout=self.a.runtime + self.a.ramp + 300)
            if p.returncode not in (0, 3) or not out.strip():
                raise RuntimeError(f"load generator failed ({p.returncode}): {err}")
            r = json.loads(out)
            iops += r["iops"]
            errors += r["errors"]
        return iops, errors

    def sample_while(self, procs: list[subprocess.Popen], t0: float, pids: list[int]
                     ) -> list[int]:
        """PSS of each pid in the middle of the measured run."""
        return [p for p, _ in self.sample_both(procs, t0, pids)]

    def sample_both(self, procs: list[subprocess.Popen], t0: float, pids: list[int]
                    ) -> list[tuple[int, int]]:
        """(PSS, anonymous PSS) of each pid in the middle of the run."""
        time.sleep(max(0.0, t0 + self.a.ramp + self.a.runtime / 2 - time.monotonic()))
        return [(pss_kib(p), anon_kib(p)) for p in pids]

    def run_ours(self, n: int, sector_size: int) -> dict:
        bench.log(f"ours: {n} daemons, {sector_size}-byte chunks")
        overlays = self.new_overlays("ours", n, sector_size)
        bench.warm(self.base)
        daemons = [self.start_ours(i) for i in range(n)]
        idle = [pss_kib(d.pid) for d in daemons]
        try:
            procs, t0 = self.loads([d.sock for d in daemons], 1000)
            busy = self.sample_while(procs, t0, [d.pid for d in daemons])
            iops, errors = self.finish(procs)
        finally:
            exits = [d.stop()["exit"] for d in daemons]
        return {
            "who": "ours", "n": n, "sector_size": sector_size, "iops": iops, "errors": errors,
            "exits": sorted(set(map(str, exits))),
            "pss_idle_kib": idle, "pss_kib": busy,
            "per_daemon_pss_kib": statistics.mean(busy), "total_pss_kib": sum(busy),
            "backing_cache_bytes": cached_bytes(self.base),
            "overlay_cache_bytes": cached_bytes(*overlays),
        }

    def start_ours_exports(self, indices: list[int], tag: str) -> bench.Daemon:
        """One daemon serving the overlays of `indices`, each on its own
        socket (serve --export)."""
        argv = [str(self.ours), "serve", "--num-queues", "1"]
        for i in indices:
            self.sock("ours", i).unlink(missing_ok=True)
            argv += ["--export", f"disk={self.overlay('ours', i)},socket={self.sock('ours', i)},"
                     f"format=cow,backing={self.base}"]
        argv += self.a.ours_args.split()
        # The sockets are bound in order: the last one there means all are.
        return bench.Daemon(argv, self.sock("ours", indices[-1]),
                            self.out / "logs" / f"ours-{tag}.log")

    def run_ours_one_process(self, n: int, sector_size: int) -> dict:
        """Ours as qsd's one process: per export (PSS_N − PSS_1)/(N − 1),
        PSS_1 from a process serving one disk under the same load (a
        process serves at least one disk, so the first counts as its
        floor)."""
        bench.log(f"ours: one process, {n} exports, {sector_size}-byte chunks")
        overlays = self.new_overlays("ours", n, sector_size)
        bench.warm(self.base)
        samples = []
        for indices in ([0], list(range(n))):
            d = self.start_ours_exports(indices, f"1x{len(indices)}")
            try:
                procs, t0 = self.loads([self.sock("ours", i) for i in indices], 1000)
                (sample,) = self.sample_both(procs, t0, [d.pid])
                iops, errors = self.finish(procs)
            finally:
                exit_code = d.stop()["exit"]
            samples.append(sample)
        (pss1, anon1), (pss, anon) = samples
        return {
            "who": "ours-1-process", "n": n, "sector_size": sector_size, "iops": iops,
            "errors": errors,
            "exits": [str(exit_code)],
            "pss1_kib": pss1, "pss_kib": pss, "anon1_kib": anon1, "anon_kib": anon,
            "per_export_pss_kib": (pss - pss1) / max(1, n - 1),
            "per_export_anon_kib": (anon - anon1) / max(1, n - 1),
            "backing_cache_bytes": cached_bytes(self.base),
            "overlay_cache_bytes": cached_bytes(*overlays),
        }

    def run_qsd_one_process(self, n: int) -> dict:
        bench.log(f"qsd: one process, {n} exports")
        zero = self.start_qsd([], "0")
        pss0, anon0 = pss_kib(zero.pid), anon_kib(zero.pid)
        zero.terminate()
        zero.wait(timeout=30)
        overlays = self.new_overlays("qsd", n)
        bench.warm(self.base)
        p = self.start_qsd(list(range(n)), f"1x{n}")
        try:
            procs, t0 = self.loads([self.sock("qsd", i) for i in range(n)], 1000)
            ((pss, anon),) = self.sample_both(procs, t0, [p.pid])
            iops, errors = self.finish(procs)
        finally:
            p.terminate()
            p.wait(timeout=30)
        return {
            "who": "qsd-1-process", "n": n, "iops": iops, "errors": errors,
            "pss0_kib": pss0, "pss_kib": pss, "per_export_pss_kib": (pss - pss0) / n,
            "anon0_kib": anon0, "anon_kib": anon, "per_export_anon_kib": (anon - anon0) / n,
            "backing_cache_bytes": cached_bytes(self.base),
            "overlay_cache_bytes": cached_bytes(*overlays),
        }

    def run_qsd_processes(self, n: int) -> dict:
        bench.log(f"qsd: {n} processes")
        overlays = self.new_overlays("qsd", n)
        bench.warm(self.base)
        procs_qsd = [self.start_qsd([i], f"{n}-{i}") for i in range(n)]
        try:
            procs, t0 = self.loads([self.sock("qsd", i) for i in range(n)], 1000)
            busy = self.sample_while(procs, t0, [p.pid for p in procs_qsd])
            iops, errors = self.finish(procs)
        finally:
            for p in procs_qsd:
                p.terminate()
            for p in procs_qsd:
                p.wait(timeout=30)
        return {
            "who": f"qsd-{n}-processes", "n": n, "iops": iops, "errors": errors,
            "pss_kib": busy, "per_daemon_pss_kib": statistics.mean(busy),
            "total_pss_kib": sum(busy),
            "backing_cache_bytes": cached_bytes(self.base),
            "overlay_cache_bytes": cached_bytes(*overlays),
        }


def markdown(results: list[dict], meta: dict) -> str:
    mib = lambda kib: f"{kib / 1024:.1f}"  # noqa: E731
    lines = [
        f"Golden image {meta['size'] >> 20} MiB, each load generator 70/30 random "
        f"read/write 4 KiB at QD{meta['iodepth']}, {meta['runtime']} s measured after "
        f"{meta['ramp']} s; {meta['date']}, load average before {meta['loadavg']}.",
        "",
        "| N | setup | per daemon / export PSS (MiB) | total PSS (MiB) | aggregate IOPS "
        "| backing in page cache (MiB) | overlays in page cache (MiB) | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r["who"] == "qsd-1-process":
            per = (f"{mib(r['per_export_pss_kib'])} ((PSS_N − PSS_0)/N, PSS_0 "
                   f"{mib(r['pss0_kib'])}; anonymous {mib(r['per_export_anon_kib'])})")
            total = mib(r["pss_kib"])
        elif r["who"] == "ours-1-process":
            per = (f"{mib(r['per_export_pss_kib'])} ((PSS_N − PSS_1)/(N − 1), "
                   f"PSS_1 {mib(r['pss1_kib'])}; anonymous {mib(r['per_export_anon_kib'])})")
            total = mib(r["pss_kib"])
        else:
            per = f"{mib(r['per_daemon_pss_kib'])} (max {mib(max(r['pss_kib']))})"
            total = mib(r["total_pss_kib"])
        who = r["who"] + (f" ({r['sector_size']}-byte chunks)" if "sector_size" in r else "")
        lines.append(f"| {r['n']} | {who} | {per} | {total} | {r['iops']:.0f} "
                     f"| {r['backing_cache_bytes'] / (1 << 20):.0f} "
                     f"| {r['overlay_cache_bytes'] / (1 << 20):.1f} | {r['errors']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", nargs="+", type=int, default=[8, 32], help="daemons per run")
    p.add_argument("--size", type=bench.parse_size, default=1 << 30,
                   help="golden image size (default 1G)")
    p.add_argument("--runtime", type=float, default=10.0, help="measured seconds")
    p.add_argument("--ramp", type=float, default=2.0, help="warm-up seconds")
    p.add_argument("--iodepth", type=int, default=4, help="requests in flight per VM")
    p.add_argument("--workdir", default="/var/tmp/vhost-user-cow-density")
    p.add_argument("--output", help="results directory (default bench-results/density-DATE)")
    p.add_argument("--bin-dir", help="where vhost-user-cow and vhost-user-cow-load are "
                   "(default: build them in release mode)")
    p.add_argument("--ours-args", default="", help="extra arguments for vhost-user-cow serve")
    p.add_argument("--sector-sizes", nargs="+", type=int, default=[512],
                   help="our overlays' chunk sizes (create --sector-size), a run of ours "
                   "for each (default 512)")
    a = p.parse_args()
    if not a.output:
        a.output = str(bench.ROOT / "bench-results" / f"density-{dt.datetime.now():%Y%m%d-%H%M%S}")
    for tool in ("qemu-storage-daemon", "qemu-img", "fincore"):
        if not bench.shutil.which(tool):
            p.error(f"{tool} is not installed")
    if not a.bin_dir:
        target = Path(bench.os.environ.get("CARGO_TARGET_DIR", bench.ROOT / "target"))
        bench.log("building release binaries")
        bench.run(["cargo", "build", "--release", "--quiet",
                   "-p", "vhost-user-cow", "--bin", "vhost-user-cow",
                   "-p", "vhost-user-cow-load", "--bin", "vhost-user-cow-load"], cwd=bench.ROOT)
        a.bin_dir = str(target / "release")
    d = Density(a)
    d.make_base()
    meta = {"size": a.size, "iodepth": a.iodepth, "runtime": a.runtime, "ramp": a.ramp,
            "date": f"{dt.datetime.now():%Y-%m-%d %H:%M}", "loadavg": bench.loadavg()}
    results = []
    for n in a.n:
        for ss in a.sector_sizes:
            results.append(d.run_ours(n, ss))
            results.append(d.run_ours_one_process(n, ss))
        results.append(d.run_qsd_one_process(n))
        results.append(d.run_qsd_processes(n))
    (Path(a.output) / "density.json").write_text(json.dumps({"meta": meta, "runs": results},
                                                            indent=1))
    text = markdown(results, meta)
    (Path(a.output) / "density.md").write_text(text)
    print(text)
    bad = [r for r in results if r["errors"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
