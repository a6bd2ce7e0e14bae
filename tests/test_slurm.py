"""Run Snakemake through the SLURM profile on a private single-node cluster.

The cluster (tests/slurm_cluster.py) is started once for the module: munged,
slurmctld and slurmd in the foreground, state in a temporary directory, the
configuration at /etc/slurm/slurm.conf (where the executor's inner ``srun``
looks).  Needs root and the Debian packages slurmctld, slurmd, slurm-client and
munge (.ci/install-system.sh); skipped only when those programs are absent.

Tests:
- teardown leaves no SLURM daemon behind and restores an existing slurm.conf;
- a toy workflow shaped like diffim's: per-visit stages batched by the
  profile's ``groups``/``group-components``, a retry that gets more memory,
  every job inside SLURM;
- the real diffim workflow on a tiny simulated dataset, through the profile.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from slurm_cluster import CONF_MARKER, DEFAULT_SLURM_CONF, SlurmCluster, daemon_pids, missing_binaries

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "profiles" / "slurm"
SNAKEMAKE = [sys.executable, "-m", "snakemake"]

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(
        bool(missing_binaries()),
        reason="SLURM is not installed (missing: " + ", ".join(missing_binaries())
        + "); run .ci/install-system.sh as root",
    ),
]

# Settings passed on the command line on top of the profile, to keep a test
# run short: the first status check after 6 s instead of the profile's 10 s
# (the toy jobs take about 5 s; polling sooner only adds a 10 s back-off).
# (The executor polls squeue; MinJobAge 300 s >= 3 x 6 s keeps that valid.)
FAST = ["--slurm-init-seconds-before-status-checks", "6"]


def _require_root():
    if os.geteuid() != 0:
        pytest.fail("tests/test_slurm.py must run as root: it writes /etc/slurm/slurm.conf "
                    "and starts slurmd (CI runs as root).")


@pytest.fixture(scope="module")
def cluster():
    _require_root()
    before = set(daemon_pids())
    c = SlurmCluster()
    c.start()
    try:
        yield c
    finally:
        c.stop()
    left = {pid: name for pid, name in daemon_pids().items() if pid not in before}
    assert not left, f"SLURM processes left running after teardown: {left}"


def run_snakemake(cluster, workdir: Path, args: list[str], *, timeout: float):
    """Run ``snakemake --profile profiles/slurm`` in *workdir*; return the CompletedProcess."""
    cmd = SNAKEMAKE + ["--profile", str(PROFILE), *FAST, *args]
    res = subprocess.run(cmd, cwd=workdir, env=cluster.env, stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        logs = "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted((workdir / ".snakemake" / "slurm_logs").rglob("*.log")))
        pytest.fail(f"snakemake exited with {res.returncode}.\nstderr (tail):\n{res.stderr[-6000:]}\n"
                    f"SLURM job logs:\n{logs[-6000:]}\nslurmctld log:\n{cluster.log_tail('slurmctld')}")
    return res


def slurm_job_ids(workdir: Path) -> set[str]:
    """SLURM job ids of the job logs the executor kept in .snakemake/slurm_logs."""
    logs = (workdir / ".snakemake" / "slurm_logs").rglob("*.log")
    return {m.group(1) for p in logs if (m := re.fullmatch(r"(\d+)\.log", p.name))}


def slurm_job_mem_mb(cluster, job_id: str) -> int:
    """Memory (MB) that SLURM granted a job, from ``scontrol show job`` (kept MinJobAge s)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=cluster.env,
                         capture_output=True, text=True, check=True).stdout
    m = re.search(r"MinMemoryNode=(\d+)([MG])", out)
    assert m, f"no memory request in: {out}"
    return int(m.group(1)) * (1024 if m.group(2) == "G" else 1)


def allocated_job_ids(cluster) -> set[str]:
    """Job ids that slurmctld's log says it started.

    The main scheduler logs ``sched: Allocate JobId=N``, the backfill
    scheduler ``sched/backfill: _start_job: Started JobId=N``.
    """
    return set(re.findall(r"(?:Allocate|Started) JobId=(\d+)", cluster.slurmctld_log()))


# --------------------------------------------------------------------------- #
def test_teardown_stops_daemons_and_restores_conf(tmp_path):
    """A cluster started and stopped leaves no daemon and the old slurm.conf intact."""
    _require_root()
    if DEFAULT_SLURM_CONF.exists() and DEFAULT_SLURM_CONF.read_text().startswith(CONF_MARKER):
        pytest.fail("a test cluster is already running (its slurm.conf is installed); this test "
                    "must run before the module's cluster fixture starts")
    before = set(daemon_pids())
    # Stand in for a site's own configuration, unless one really exists.
    original = None if not DEFAULT_SLURM_CONF.exists() else DEFAULT_SLURM_CONF.read_bytes()
    made_dir = not DEFAULT_SLURM_CONF.parent.exists()
    if original is None:
        DEFAULT_SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
        DEFAULT_SLURM_CONF.write_text("# a site's own slurm.conf (test stand-in)\n")
    expected = DEFAULT_SLURM_CONF.read_bytes()
    try:
        c = SlurmCluster()
        c.start()
        pids = {name: p.pid for name, p in c.procs.items()}
        assert set(pids) == {"munged", "slurmctld", "slurmd"}
        assert DEFAULT_SLURM_CONF.read_bytes() != expected  # ours while it runs
        state_dir = c.root
        c.stop()
        for name, pid in pids.items():
            assert not Path(f"/proc/{pid}").exists() or "Z" in _proc_state(pid), \
                f"{name} (pid {pid}) still runs after stop()"
        left = {pid: name for pid, name in daemon_pids().items() if pid not in before}
        assert not left, f"SLURM processes left running after teardown: {left}"
        assert DEFAULT_SLURM_CONF.read_bytes() == expected
        assert not state_dir.exists()
    finally:
        if original is None:
            DEFAULT_SLURM_CONF.unlink(missing_ok=True)
            if made_dir and not any(DEFAULT_SLURM_CONF.parent.iterdir()):
                DEFAULT_SLURM_CONF.parent.rmdir()


def _proc_state(pid: int) -> str:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return "gone"
    return next((line.split(":", 1)[1].strip() for line in text.splitlines()
                 if line.startswith("State:")), "")


def test_node_is_idle(cluster):
    """sinfo shows the one node idle in the default partition, with the machine's CPUs."""
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N|%P|%T|%c"], env=cluster.env,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == [f"{cluster.nodename}|debug*|idle|{cluster.hardware['cpus']}"]


TOY_SNAKEFILE = textwrap.dedent('''
    # Toy workflow shaped like diffim's: a per-visit stage (calexp), an
    # aggregate (coadd), a second per-visit stage (diff) that reads both the
    # aggregate and its own visit's calexp, and a merge; plus a job that fails
    # on its first attempt.  The rules say `group: "per_visit"` (one group for
    # the whole chain, which Snakemake rejects because the chain passes through
    # coadd); the profile's `groups:` must override that with one group per stage.
    VISITS = [1, 2, 3, 4]

    rule all:
        input: "out/merged.txt", "out/flaky.txt"

    rule calexp:
        output: "out/calexp_{visit}.txt"
        group: "per_visit"
        threads: 1
        resources: mem_mb=lambda wc, attempt: 300 * attempt, runtime=5
        shell: "echo $SLURM_JOB_ID > {output}"

    rule coadd:
        input: expand("out/calexp_{visit}.txt", visit=VISITS)
        output: "out/coadd.txt"
        resources: mem_mb=lambda wc, attempt: 300 * attempt, runtime=5
        shell: "echo $SLURM_JOB_ID > {output}"

    rule diff:
        input: "out/calexp_{visit}.txt", "out/coadd.txt"
        output: "out/diff_{visit}.txt"
        group: "per_visit"
        threads: 1
        resources: mem_mb=lambda wc, attempt: 300 * attempt, runtime=5
        shell: "echo $SLURM_JOB_ID > {output}"

    rule flaky:
        output: "out/flaky.txt"
        resources: mem_mb=lambda wc, attempt: 400 * attempt, runtime=5
        shell:
            "if [ ! -e out/flaky.tried ]; then touch out/flaky.tried; exit 1; fi; "
            "echo {resources.mem_mb} $SLURM_JOB_ID > {output}"

    rule merge:
        input: expand("out/diff_{visit}.txt", visit=VISITS)
        output: "out/merged.txt"
        shell: "cat {input} > {output}"
''')


def test_toy_workflow_groups_and_retries(cluster, tmp_path):
    """Every job runs in SLURM; per-visit stages are batched; a retry gets 2x memory."""
    (tmp_path / "Snakefile").write_text(TOY_SNAKEFILE)
    (tmp_path / "out").mkdir()
    t0 = time.monotonic()
    # --cores 2: the cluster's CPUs, so a group of 4 visits asks for 2 CPUs and
    # runs its visits two at a time instead of asking for 4 (which would be rejected).
    run_snakemake(cluster, tmp_path, ["--cores", "2"], timeout=240)
    elapsed = time.monotonic() - t0

    ids = {p.name: p.read_text().split() for p in (tmp_path / "out").glob("*.txt")}
    # Every job ran inside a SLURM allocation.
    for name in ["coadd.txt"] + [f"{r}_{v}.txt" for r in ("calexp", "diff") for v in range(1, 5)]:
        assert ids[name] and ids[name][0].isdigit(), f"{name} was not written inside a SLURM job"
    # groups/group-components: the 4 visits of each stage share one SLURM job,
    # and the two stages are different SLURM jobs (coadd runs between them).
    calexp_jobs = {ids[f"calexp_{v}.txt"][0] for v in range(1, 5)}
    diff_jobs = {ids[f"diff_{v}.txt"][0] for v in range(1, 5)}
    assert len(calexp_jobs) == 1 and len(diff_jobs) == 1, \
        f"per-visit jobs were not batched: calexp in {calexp_jobs}, diff in {diff_jobs}"
    assert len(calexp_jobs | diff_jobs | {ids["coadd.txt"][0]}) == 3
    # The retry (attempt 2) asked for 2 x 400 MB, and SLURM granted that.
    mem_mb, flaky_job = ids["flaky.txt"]
    assert mem_mb == "800"
    assert slurm_job_mem_mb(cluster, flaky_job) == 800
    # The SLURM logs and slurmctld's own log both know these jobs:
    # calexp group, coadd, diff group, flaky x2, merge.
    kept = slurm_job_ids(tmp_path)
    assert calexp_jobs | diff_jobs | {ids["coadd.txt"][0], flaky_job} <= kept
    assert kept <= allocated_job_ids(cluster)
    assert len(kept) == 6
    print(f"toy workflow through SLURM: {elapsed:.1f} s, SLURM jobs {sorted(kept, key=int)}")


def test_real_workflow_through_slurm(cluster, tmp_path):
    """The diffim workflow, through the profile, writes its products from SLURM jobs.

    Uses the tiny simulated dataset of tests/test_workflow.py (conftest's
    ``tiny_config``) with 4 visits and large patches (fewer warp and coadd
    jobs), given as a config file: ``--config simulate='{shape: [400, 400]}'``
    would reach the workflow as strings (Snakemake parses only top-level values).
    """
    from conftest import tiny_config

    snakefile = REPO / "Snakefile"
    assert snakefile.exists(), f"the workflow's Snakefile is missing: {snakefile}"
    outdir = tmp_path / "results"
    config = tiny_config(outdir=str(outdir), simulate={"n_visits": 4}, skymap={"patch_inner": 600})
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(config))
    before = allocated_job_ids(cluster)
    t0 = time.monotonic()
    # --cores 2 (the node's CPUs) caps each batch at 2 CPUs; one batch per
    # per-visit stage (instead of the profile's 4 visits) saves a SLURM round
    # trip (~15 s of polling plus Snakemake's start-up in the job) per batch.
    run_snakemake(cluster, tmp_path,
                  ["--snakefile", str(snakefile), "--cores", "2", "--configfile", str(config_file),
                   "--group-components", "calexp_batch=100", "warp_batch=100", "diff_batch=100"],
                  timeout=540)
    elapsed = time.monotonic() - t0
    for product in ("dia_sources.parquet", "visit_status.parquet", "coadd_inputs.parquet"):
        assert (outdir / product).is_file(), f"{product} was not written"
    kept = slurm_job_ids(tmp_path)
    new = allocated_job_ids(cluster) - before
    assert kept, "no SLURM job logs in .snakemake/slurm_logs: the jobs did not go through SLURM"
    assert kept <= new, "job logs name SLURM jobs that slurmctld never started"
    # Each per-visit stage ran as exactly one batched SLURM job.
    logs = tmp_path / ".snakemake" / "slurm_logs"
    for stage in ("calexp", "warp", "diff"):
        jobs = [p for g in logs.glob(f"group_{stage}_batch*") for p in g.rglob("*.log")]
        assert len(jobs) == 1, f"{stage}: expected one batched SLURM job, found {jobs}"
    print(f"real workflow through SLURM: {elapsed:.1f} s, {len(kept)} SLURM jobs")
