"""A real one-node SLURM cluster on this machine, for tests (Debian's ``slurm-wlm`` and ``munge``).

:func:`start` writes a ``slurm.conf`` in a temporary folder (this host as controller and only node,
``ProctrackType=proctrack/linuxproc``, ``TaskPlugin=task/none``, ``SelectType=select/cons_tres``, free ports,
``SlurmdParameters=config_overrides`` so the node may offer more CPUs than the machine has and small jobs run
side by side), starts ``munged`` (unless one runs), ``slurmctld`` and ``slurmd``, and waits until the node is
idle; every SLURM command the tests run finds the cluster through ``SLURM_CONF``. :func:`stop` cancels what
is left and stops the daemons it started. Needs root (the daemons run as root, ``SlurmUser=root``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "srun", "sbatch", "scontrol", "squeue", "sacct", "sinfo")


@dataclass
class Cluster:
    """A running cluster: its folder, the environment that reaches it, the daemons this process started."""

    root: Path
    env: dict[str, str]
    pids: list[int] = field(default_factory=list)

    def run(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a SLURM command (``squeue``, ``scancel``, ``scontrol``...) against this cluster."""
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout)

    def log(self) -> str:
        """The controller's and the node daemon's logs (for failure messages)."""
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(self.root.glob("*.log")))


def unavailable() -> str | None:
    """Why no cluster can start here (None when one can)."""
    if os.name != "posix" or os.geteuid() != 0:
        return "the SLURM daemons need root"
    missing = [d for d in ("munged", "slurmctld", "slurmd", "srun", "sbatch") if shutil.which(d) is None]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _conf(root: Path, host: str, cpus: int, memory_mb: int) -> str:
    return "\n".join([
        "ClusterName=dmtc-tests", f"SlurmctldHost={host}", "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/munge", "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "SlurmdParameters=config_overrides",
        f"StateSaveLocation={root / 'state'}", f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}", f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}", f"SlurmdLogFile={root / 'slurmd.log'}",
        f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}", "ReturnToService=2", "MpiDefault=none",
        "JobRequeue=1", "KillWait=5", "MinJobAge=600", "InactiveLimit=0",
        f"NodeName={host} CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN",
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES", "",
    ])


def _munge_running() -> bool:
    return subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0


def start(root: Path, cpus: int = 8, memory_mb: int = 16000, timeout: float = 60) -> Cluster:
    """Start a one-node cluster with its files under ``root``; waits until the node is idle."""
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("state", "spool"):
        (root / sub).mkdir(exist_ok=True)
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(_conf(root, host, cpus, memory_mb))
    env = dict(os.environ, SLURM_CONF=str(conf))
    cluster = Cluster(root, env)
    if not _munge_running():
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        subprocess.run(["munged", "--force"], check=True, capture_output=True)
        cluster.pids += [int(p) for p in subprocess.run(["pgrep", "-x", "munged"], capture_output=True,
                                                        text=True).stdout.split()]
    subprocess.run(["slurmctld", "-c"], env=env, check=True, capture_output=True)
    subprocess.run(["slurmd", "-c"], env=env, check=True, capture_output=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name in ("slurmctld.pid", "slurmd.pid"):
            pid = root / name
            if pid.is_file() and pid.read_text().strip() and int(pid.read_text()) not in cluster.pids:
                cluster.pids.append(int(pid.read_text()))
        state = cluster.run("sinfo", "-h", "-o", "%t").stdout.split()
        if state and state[0] in ("idle", "mix", "alloc"):
            return cluster
        time.sleep(0.2)
    stop(cluster)
    raise RuntimeError(f"the SLURM node did not come up within {timeout:.0f} s:\n{cluster.log()}")


def stop(cluster: Cluster) -> None:
    """Cancel the cluster's jobs and stop the daemons :func:`start` started."""
    cluster.run("scancel", "--full", "--user=root")
    for pid in reversed(cluster.pids):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + 20
    for pid in cluster.pids:
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
