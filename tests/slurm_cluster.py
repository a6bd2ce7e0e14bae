"""A private single-node SLURM cluster for tests, started without systemd.

The cluster runs ``munged``, ``slurmctld`` and ``slurmd`` in the foreground as
children of the test process; each is stopped by its own PID at teardown.
All state (munge key and socket, StateSaveLocation, SlurmdSpoolDir, logs, PID
files) lives in one temporary directory.

One piece of global state cannot be avoided: Snakemake's SLURM executor runs
each job's inner ``srun`` with ``SLURM_CONF`` stripped from the environment,
so ``srun`` only finds the configuration at the compiled-in default path
``/etc/slurm/slurm.conf``.  The cluster therefore writes its configuration
there (it must run as root), after moving any existing file aside, and puts
the original back at teardown.

Usage::

    with SlurmCluster() as cluster:
        subprocess.run(["sinfo"], env=cluster.env, check=True)
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

#: Debian binaries the cluster needs (packages slurmctld, slurmd, slurm-client, munge).
REQUIRED_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "sinfo", "scontrol")

#: Where srun looks for its configuration when SLURM_CONF is not set.
DEFAULT_SLURM_CONF = Path("/etc/slurm/slurm.conf")

#: First line of every configuration this module writes, so that a file left
#: behind by a killed test run can be recognised and replaced safely.
CONF_MARKER = "# written by diffim tests/slurm_cluster.py"

#: Name of the only partition.
PARTITION = "debug"

#: Held while a test cluster runs, so two test sessions on one machine take
#: turns instead of overwriting each other's /etc/slurm/slurm.conf.
LOCK_FILE = Path("/run/lock/diffim-slurm-test.lock")

#: Process names of SLURM daemons, for checking that teardown left none behind.
DAEMON_NAMES = ("slurmctld", "slurmd", "slurmstepd")


def missing_binaries() -> list[str]:
    """Return the names of required SLURM/munge binaries not found on PATH.

    ``munged``, ``slurmctld`` and ``slurmd`` live in ``/usr/sbin``, which is
    not on every user's PATH, so that directory is searched as well.
    """
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    return [name for name in REQUIRED_BINARIES if shutil.which(name, path=path) is None]


def daemon_pids() -> dict[int, str]:
    """Return ``{pid: name}`` of every running SLURM daemon process (from /proc).

    Zombie processes are ignored: they no longer run and only wait to be reaped.
    """
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:  # the process ended while we looked
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        name = fields.get("Name", "").strip()
        state = fields.get("State", "").strip()
        if state.startswith("Z"):
            continue
        if name in DAEMON_NAMES or name.startswith("slurmstepd"):
            found[int(entry.name)] = name
    return found


def _free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_hardware() -> dict[str, int]:
    """Return this machine's CPUs and RealMemory (MiB) as ``slurmd -C`` reports them."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True,
                         env=_sbin_env(os.environ)).stdout
    first = out.splitlines()[0]
    fields = dict(item.split("=", 1) for item in first.split() if "=" in item)
    return {"cpus": int(fields["CPUs"]), "real_memory": int(fields["RealMemory"])}


def _sbin_env(env) -> dict[str, str]:
    env = dict(env)
    env["PATH"] = env.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    return env


class SlurmCluster:
    """Start and stop a single-node SLURM cluster on this machine.

    Parameters
    ----------
    min_job_age : int, keyword-only
        Seconds that slurmctld keeps a finished job visible to ``squeue``
        (``MinJobAge``).  Snakemake's executor reads job states with
        ``squeue`` here (there is no accounting database, so ``sacct``
        fails); it needs at least three times its first status-check delay,
        and a finished job must not vanish before it is seen.
    start_timeout : float, keyword-only
        Seconds to wait for the node to become idle.
    """

    def __init__(self, *, min_job_age: int = 300, start_timeout: float = 30.0,
                 lock_timeout: float = 900.0):
        if os.geteuid() != 0:
            raise PermissionError(
                "The test SLURM cluster must run as root: it writes /etc/slurm/slurm.conf "
                "and runs slurmd, which starts jobs as their submitting user."
            )
        missing = missing_binaries()
        if missing:
            raise FileNotFoundError(
                "The test SLURM cluster needs these programs, which are not installed: "
                + ", ".join(missing) + ". Run .ci/install-system.sh as root."
            )
        self.min_job_age = min_job_age
        self.lock_timeout = lock_timeout
        self._lock = None
        self.start_timeout = start_timeout
        self.root: Path | None = None
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf_path = DEFAULT_SLURM_CONF
        self._backup: Path | None = None
        self._created_conf_dir = False
        self._installed = False
        self.env: dict[str, str] = {}
        self.nodename = socket.gethostname().split(".")[0]
        self.hardware: dict[str, int] = {}

    # ------------------------------------------------------------------ setup
    def _acquire_lock(self) -> None:
        LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
        self._lock = open(LOCK_FILE, "w")
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self._lock.close()
                    self._lock = None
                    raise TimeoutError(
                        f"Another test SLURM cluster held {LOCK_FILE} for more than "
                        f"{self.lock_timeout:.0f} s; is a test session stuck?"
                    ) from None
                time.sleep(1.0)

    def _release_lock(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def _write_munge_key(self) -> Path:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        return key

    def _slurm_conf(self) -> str:
        r = self.root
        hw = self.hardware
        ctld_port, slurmd_port = _free_port(), _free_port()
        # Each line is a deliberate choice; see docs/slurm.md for the reasons.
        lines = [
            CONF_MARKER,
            "ClusterName=diffimtest",
            f"SlurmctldHost={self.nodename}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={r / 'munge' / 'munge.sock'}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "MailProg=/bin/true",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            # No cgroups in containers: track processes through /proc.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/affinity",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            # Keep finished jobs visible to squeue long enough for Snakemake.
            f"MinJobAge={self.min_job_age}",
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            # Jobs share the node by cores and memory, so several run at once.
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "DefMemPerCPU=1000",
            # Reject at submission a job that can never fit, instead of
            # letting it pend forever.
            "EnforcePartLimits=ALL",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
            "InactiveLimit=0",
            "KillWait=5",
            "Waittime=0",
            (f"NodeName={self.nodename} NodeAddr=127.0.0.1 CPUs={hw['cpus']} "
             f"RealMemory={hw['real_memory']} State=UNKNOWN"),
            (f"PartitionName={PARTITION} Nodes={self.nodename} Default=YES "
             f"MaxTime=INFINITE State=UP MaxCPUsPerNode={hw['cpus']} "
             f"MaxMemPerNode={hw['real_memory']}"),
        ]
        return "\n".join(lines) + "\n"

    def _install_conf(self, text: str) -> None:
        conf_dir = self.conf_path.parent
        if not conf_dir.exists():
            conf_dir.mkdir(parents=True)
            self._created_conf_dir = True
        backup = self.conf_path.with_name("slurm.conf.diffim-backup")
        if self.conf_path.exists():
            old = self.conf_path.read_text(errors="replace")
            if old.startswith(CONF_MARKER):
                logger.warning("Replacing %s left behind by an earlier test run.", self.conf_path)
                if backup.exists():  # that run's backup of the site's file
                    self._backup = backup
            elif backup.exists():
                raise FileExistsError(
                    f"Both {self.conf_path} and {backup} exist; the test cluster will not "
                    f"overwrite either. Remove the one that is not this machine's configuration."
                )
            else:
                shutil.copy2(self.conf_path, backup)
                self._backup = backup
                logger.info("Moved the existing %s aside to %s.", self.conf_path, backup)
        self._installed = True
        self.conf_path.write_text(text)
        (self.root / "slurm.conf").write_text(text)  # a copy next to the logs

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "wb")
        try:
            self.procs[name] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self.env, start_new_session=True,
            )
        finally:
            log.close()

    def _wait_for(self, what: str, predicate, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"The test cluster's {name} exited with code {proc.returncode} while "
                        f"waiting for {what}. Its log:\n{self.log_tail(name)}"
                    )
            if predicate():
                return
            time.sleep(0.2)
        raise TimeoutError(
            f"The test SLURM cluster did not reach '{what}' within {timeout:.0f} s.\n"
            f"slurmctld log:\n{self.log_tail('slurmctld')}\nslurmd log:\n{self.log_tail('slurmd')}"
        )

    def _node_state(self) -> str:
        res = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True,
                             text=True, env=self.env)
        return res.stdout.strip() if res.returncode == 0 else ""

    def start(self) -> "SlurmCluster":
        """Start munged, slurmctld and slurmd; return once the node is idle."""
        self.hardware = node_hardware()
        self._acquire_lock()
        self.root = Path(tempfile.mkdtemp(prefix="diffim-slurm-"))
        # munged insists that everyone may traverse its socket's directory.
        self.root.chmod(0o755)
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir()
        (self.root / "munge").chmod(0o755)
        self.env = _sbin_env(os.environ)
        self.env["SLURM_CONF"] = str(self.conf_path)
        try:
            key = self._write_munge_key()
            m = self.root / "munge"
            self._spawn("munged", ["munged", "--foreground", f"--key-file={key}",
                                   f"--socket={m / 'munge.sock'}", f"--pid-file={m / 'munged.pid'}",
                                   f"--log-file={m / 'munged.log'}", f"--seed-file={m / 'munged.seed'}"])
            self._wait_for("munge socket", lambda: (m / "munge.sock").exists(), 10)
            self._install_conf(self._slurm_conf())
            self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf_path)])
            self._spawn("slurmd", ["slurmd", "-D", "-N", self.nodename, "-f", str(self.conf_path)])
            self._wait_for("node idle", lambda: self._node_state() == "idle", self.start_timeout)
        except BaseException:
            self.stop()
            raise
        logger.info("Test SLURM cluster up in %s (node %s, %d CPUs).",
                    self.root, self.nodename, self.hardware["cpus"])
        return self

    # --------------------------------------------------------------- teardown
    def _cancel_all_jobs(self) -> None:
        if "slurmctld" not in self.procs or self.procs["slurmctld"].poll() is not None:
            return
        subprocess.run(["scancel", "--full", "--user", "root"], capture_output=True, env=self.env)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            res = subprocess.run(["squeue", "-h", "-t", "PENDING,RUNNING,COMPLETING,SUSPENDED",
                                  "-o", "%i"], capture_output=True, text=True, env=self.env)
            if res.returncode != 0 or not res.stdout.strip():
                return
            time.sleep(0.5)

    def _stop_proc(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            logger.warning("%s (pid %d) ignored SIGTERM; killing it.", name, proc.pid)
            proc.kill()
            proc.wait(timeout=5)

    def _wait_stepds_gone(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not any(n.startswith("slurmstepd") for n in daemon_pids().values()):
                return
            time.sleep(0.2)

    def stop(self) -> None:
        """Cancel remaining jobs, stop the daemons by PID and restore slurm.conf.

        Safe to call more than once, and after a failed start.
        """
        try:
            self._cancel_all_jobs()
            self._wait_stepds_gone()
            for name in ("slurmd", "slurmctld", "munged"):
                self._stop_proc(name)
        finally:
            try:
                self._restore_conf()
                if self.root is not None and os.environ.get("DIFFIM_KEEP_SLURM_STATE") is None:
                    shutil.rmtree(self.root, ignore_errors=True)
            finally:
                self._release_lock()

    def _restore_conf(self) -> None:
        if not self._installed:  # never installed ours (or already restored)
            return
        self._installed = False
        if self.conf_path.exists() and self.conf_path.read_text(errors="replace").startswith(CONF_MARKER):
            self.conf_path.unlink()
        if self._backup is not None and self._backup.exists():
            shutil.move(self._backup, self.conf_path)
            self._backup = None
        if self._created_conf_dir and not any(self.conf_path.parent.iterdir()):
            self.conf_path.parent.rmdir()
            self._created_conf_dir = False

    # ---------------------------------------------------------------- helpers
    def log_tail(self, name: str, lines: int = 40) -> str:
        """Return the last lines of a daemon's log (``slurmctld``, ``slurmd``, ``munged``)."""
        if self.root is None:
            return ""
        candidates = [self.root / "log" / f"{name}.log", self.root / "munge" / f"{name}.log",
                      self.root / "log" / f"{name}.stdout"]
        out = []
        for path in candidates:
            if path.exists():
                out.extend(path.read_text(errors="replace").splitlines()[-lines:])
        return "\n".join(out)

    def slurmctld_log(self) -> str:
        """Return the whole slurmctld log."""
        path = self.root / "log" / "slurmctld.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
