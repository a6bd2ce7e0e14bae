"""Peer benchmark driver: simulate pairs, run every method in its own process, score, tabulate.

Run through ``bash benchmarks/peers/run.sh [options]`` (it prepares the benchmark virtualenv).
Results are merged into results/results.json (re-running a subset updates only those entries)
and results/results.md is rebuilt from the whole JSON.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import platform
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import score  # noqa: E402
import simulate  # noqa: E402

logger = logging.getLogger("peers")
METHODS = ["oracle", "diffim", "hotpants", "stdpipe", "sfft", "properimage"]
PAIRS = list(simulate.DIRECTIONS)
SIZES = [2048, 4096]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=SIZES, help="image sizes (px)")
    ap.add_argument("--pairs", nargs="+", default=PAIRS, choices=PAIRS, help="PSF directions")
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--all", action="store_true", help="also run properimage above 2048^2 (slow)")
    ap.add_argument("--timeout", type=float, default=1500.0, help="seconds per method run")
    ap.add_argument("--work", type=Path, default=HERE / "work", help="scratch directory")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--mem-limit-gb", type=float, default=20.0,
                    help="address-space limit of each method process (RLIMIT_AS), so that a method "
                         "that needs more fails cleanly instead of waking the OOM killer")
    ap.add_argument("--regenerate", action="store_true", help="re-simulate pairs even if present")
    return ap.parse_args(argv)


def ensure_pair(work: Path, n: int, direction: str, regenerate: bool) -> Path:
    d = work / "pairs" / f"{direction}_{n}"
    if regenerate or not (d / "truth" / "params.json").exists():
        logger.info("simulating %s", d.name)
        simulate.simulate_pair(d, n, direction, seed=simulate.pair_seed(n, direction))
    return d


def _limit_memory(gb: float):
    """preexec_fn: cap the child's address space at ``gb`` GiB."""
    def apply():
        lim = int(gb * 1024 ** 3)
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    return apply


def worker_env() -> dict:
    """Every method runs with the glibc settings the diffim workflow uses for its jobs
    (freed memory kept in the process; see the README's performance section)."""
    from diffim.malloc import ENVIRONMENT
    return {**ENVIRONMENT, **os.environ}


def run_worker(method: str, pairdir: Path, rundir: Path, timeout: float, mem_gb: float) -> dict:
    """Run worker.py in a fresh process group; wall time and the tree's peak RSS via wait4."""
    if rundir.exists():
        shutil.rmtree(rundir)
    rundir.mkdir(parents=True)
    log = open(rundir / "worker.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(HERE / "worker.py"), method, str(pairdir), str(rundir)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=_limit_memory(mem_gb), env=worker_env())
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() - t0 > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            _, status, ru = os.wait4(proc.pid, 0)
            log.close()
            return dict(status="timeout", process_seconds=time.perf_counter() - t0)
        time.sleep(0.2)
    log.close()
    out = dict(process_seconds=time.perf_counter() - t0, process_peak_rss_mb=ru.ru_maxrss / 1024.0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = (rundir / "worker.log").read_text(errors="replace").strip().splitlines()
        text = "\n".join(tail)
        if "MemoryError" in text or "Unable to allocate" in text or "std::bad_alloc" in text:
            out.update(status=f"out of memory (> {mem_gb:g} GB address space)")
        elif code < 0:
            out.update(status=f"killed by signal {-code}")
        else:
            out.update(status="failed")
        out.update(error=(tail[-1] if tail else f"exit code {code}")[:300])
        return out
    meta = json.loads((rundir / "meta.json").read_text())
    out.update(status="ok", seconds=meta["seconds"], peak_rss_mb=meta["rss_after_method_mb"],
               rss_inputs_mb=meta["rss_after_inputs_mb"], notes=meta.get("notes", ""),
               timings=meta.get("timings"), convolved=meta.get("convolved"))
    return out


def skip_reason(method: str, n: int, args) -> str | None:
    if method == "hotpants" and shutil.which("hotpants") is None:
        return "absent (no hotpants on PATH)"
    if method == "properimage" and n > 2048 and not args.all:
        return "skipped (properimage runs only at 2048^2 unless --all)"
    if method == "diffim":
        try:
            import diffim.pair  # noqa: F401
        except ImportError as exc:
            return f"absent (diffim.pair not importable: {exc})"
    return None


def versions() -> dict:
    v = dict(python=platform.python_version())
    for pkg in ("numpy", "diffim", "stdpipe", "sfft", "properimage"):
        try:
            v[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            v[pkg] = "absent"
    try:
        rev = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        v["diffim"] += f" (git {rev})"
    except (OSError, subprocess.CalledProcessError):
        pass
    hp = shutil.which("hotpants")
    v["hotpants"] = hp if hp else "absent"
    for exe in ("source-extractor", "psfex"):
        v[exe] = "present" if shutil.which(exe) else "absent"
    return v


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        mem_kb = 0
    return dict(cpu=cpu, cores=os.cpu_count(), ram_gb=round(mem_kb / 1024 ** 2, 1))


def fmt(x, f="{:.3f}"):
    return "—" if x is None else f.format(x)


def pm(x, err, f="{:.4f}", ef=None):
    """``x ± err`` (just ``x`` when the run predates the uncertainty); ``ef`` formats ``err``."""
    if x is None or err is None:
        return fmt(x, f)
    return f"{f.format(x)} ± {(ef or f).format(err)}"


def flux_vs_oracle(per_method: dict, m: str) -> str:
    """Median over transients of (method - oracle) forced-flux ratio, ± its bootstrap std.

    The same transients and the same science-image noise enter both, so the paired difference
    is measured far more precisely than either median (± 0.005-0.007 each at 4096²).
    """
    o, e = per_method.get("oracle", {}), per_method.get(m, {})
    a = e.get("scores", {}).get("flux_ratios")
    b = o.get("scores", {}).get("flux_ratios")
    if m == "oracle" or not a or not b or len(a) != len(b):
        return "—"
    d = np.asarray(a) - np.asarray(b)
    return pm(float(np.median(d)), score.bootstrap_median_std(d), "{:+.4f}", "{:.4f}")


def table(results: dict) -> str:
    head = ("| size | pair | method | status | time [s] | peak RSS [GB] | noise free | noise rich | "
            "noise core | FP | FN (S/N≥8) | found | S/N eff | S/N eff (renorm) | flux ratio | "
            "flux − oracle |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for key in sorted(results, key=lambda k: (int(k.rsplit("_", 1)[1]), k)):
        pair, n = key.rsplit("_", 1)
        for m in METHODS:
            e = results[key].get(m)
            if e is None:
                continue
            if e.get("status") != "ok":
                why = f": {e['error'][:80]}" if e.get("status") == "failed" and e.get("error") else ""
                lines.append(f"| {n} | {pair} | {m} | {e.get('status')}{why} " + "| " * 12 + "|")
                continue
            s = e["scores"]
            nr = s["noise_ratio"]
            lines.append(
                f"| {n} | {pair} | {m} | ok | {e['seconds']:.1f} | {e['peak_rss_mb'] / 1024:.2f} | "
                f"{fmt(nr['star_free'])} | {fmt(nr['star_rich'])} | {fmt(nr['bright_core'])} | "
                f"{s['fp']} | {s['fn']} | {s['found']}/{s['n_transients']} | "
                f"{pm(s['snr_eff'], s.get('snr_eff_err'), '{:.3f}')} | {fmt(s['snr_eff_renorm'])} | "
                f"{pm(s['flux_ratio'], s.get('flux_ratio_err'))} | {flux_vs_oracle(results[key], m)} |")
    return "\n".join(lines)


def catalogue_table(results: dict) -> str:
    rows = []
    for key in sorted(results, key=lambda k: (int(k.rsplit("_", 1)[1]), k)):
        e = results[key].get("diffim")
        if e and e.get("status") == "ok" and e["scores"].get("catalogue"):
            c = e["scores"]["catalogue"]
            pair, n = key.rsplit("_", 1)
            rows.append(f"| {n} | {pair} | {c['n_sources']} | {c['found']} | {c['fp']} | {c.get('fn')} | "
                        f"{fmt(c['flux_ratio'], '{:.4f}')} |")
    if not rows:
        return ""
    return "\n".join(["| size | pair | sources | found | FP | FN (S/N≥8) | psfFlux ratio |",
                      "|---|---|---|---|---|---|---|"] + rows)


def merged_versions(previous: dict) -> dict:
    """This environment's versions; a tool absent here keeps the version of the run that had it
    (its rows in the merged table came from that run)."""
    now = versions()
    return {k: (previous[k] if val == "absent" and previous.get(k, "absent") != "absent" else val)
            for k, val in now.items()}


def machines_line(results: dict) -> str:
    """Which machine ran which method's rows (rows are merged across runs)."""
    by_cpu = {}
    for per_method in results.values():
        for m, e in per_method.items():
            if "scores" in e or e.get("status") == "ok":
                by_cpu.setdefault(e.get("machine", "an earlier machine (not recorded)"), set()).add(m)
    return "Rows by machine: " + "; ".join(f"{', '.join(sorted(ms))}: {cpu}"
                                           for cpu, ms in by_cpu.items()) + ".  "


def write_markdown(path: Path, doc: dict) -> str:
    m, v = doc["machine"], doc["versions"]
    txt = ["# Peer benchmark results", "",
           f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM.  ",
           f"Full command: `bash benchmarks/peers/run.sh`; last command: `{doc['command']}` "
           f"({doc['updated']}; it replaced only the rows it ran).  ",
           machines_line(doc["results"]),
           "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".", "",
           table(doc["results"]), ""]
    cat = catalogue_table(doc["results"])
    if cat:
        txt += ["diffim's own catalogue (`res.sources`), same matching rules:", "", cat, ""]
    split = timing_table(doc["results"])
    if split:
        txt += ["diffim's time split (seconds): PSF models of both images, subtraction, "
                "detection + measurement:", "", split, ""]
    txt += ["Definitions: see benchmarks/peers/README.md. Time: the method call only; "
            "peak RSS: the worker process (or its largest child) at the end of that call, "
            "including the ~2 input images it loaded.", ""]
    out = "\n".join(txt)
    path.write_text(out)
    update_readme(REPO_README, "\n".join(txt[2:]))
    return out


#: The project README; the table between these markers is replaced on every run.
REPO_README = HERE.parent.parent / "README.md"
README_BEGIN, README_END = "<!-- peers-table:begin -->", "<!-- peers-table:end -->"


def update_readme(path: Path, text: str) -> None:
    """Replace the text between the README's peer-table markers (if both are present)."""
    if not path.exists():
        return
    doc = path.read_text()
    i, j = doc.find(README_BEGIN), doc.find(README_END)
    if i < 0 or j < i:
        logger.warning("%s has no %s ... %s markers; table not copied", path, README_BEGIN,
                       README_END)
        return
    new = doc[:i + len(README_BEGIN)] + "\n" + text.strip() + "\n" + doc[j:]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new)
    tmp.replace(path)


def timing_table(results: dict) -> str:
    rows = []
    for key in sorted(results, key=lambda k: (int(k.rsplit("_", 1)[1]), k)):
        e = results[key].get("diffim")
        if e and e.get("status") == "ok" and e.get("timings"):
            t = e["timings"]
            pair, n = key.rsplit("_", 1)
            rows.append(f"| {n} | {pair} | {t.get('characterize', 0):.1f} | "
                        f"{t.get('subtract', 0):.1f} | {t.get('detect', 0):.1f} | "
                        f"{t.get('total', 0):.1f} |")
    if not rows:
        return ""
    return "\n".join(["| size | pair | PSF models | subtraction | detection | total |",
                      "|---|---|---|---|---|---|"] + rows)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    jpath = args.results / "results.json"
    doc = json.loads(jpath.read_text()) if jpath.exists() else {"results": {}}
    for n in args.sizes:
        for direction in args.pairs:
            pairdir = ensure_pair(args.work, n, direction, args.regenerate)
            key = f"{direction}_{n}"
            for m in args.methods:
                reason = skip_reason(m, n, args)
                if reason:
                    entry = dict(status=reason)
                else:
                    logger.info("%s: running %s", key, m)
                    entry = run_worker(m, pairdir, args.work / "runs" / key / m, args.timeout, args.mem_limit_gb)
                    if entry["status"] == "ok":
                        # Truth is reloaded per score, not kept: the next worker gets the memory.
                        entry["scores"] = score.score(pairdir, args.work / "runs" / key / m)
                logger.info("%s %s: %s", key, m, {k: v for k, v in entry.items() if k != "scores"})
                entry["machine"] = machine()["cpu"]
                doc["results"].setdefault(key, {})[m] = entry
                doc.update(machine=machine(), versions=merged_versions(doc.get("versions", {})),
                           command="bash benchmarks/peers/run.sh " + shlex.join(sys.argv[1:] if argv is None else argv),
                           updated=_dt.datetime.now().strftime("%Y-%m-%d %H:%M"))
                jpath.write_text(json.dumps(doc, indent=1, default=float))
                md = write_markdown(args.results / "results.md", doc)
    print(md if "md" in locals() else write_markdown(args.results / "results.md", doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
