"""A real single-node SLURM cluster with accounting, for the tests that submit jobs to it.

Debian's packages (slurmctld slurmd slurm-client munge slurmdbd mariadb-server; `.ci/run`
installs them) and root. Everything is private to one state folder: a munge key and socket,
a MariaDB datadir on its own port, generated ``slurm.conf`` / ``slurmdbd.conf`` on free ports
(``SLURM_CONF`` points every client at them, so a system-wide config is never read), and each
daemon's log. The daemons run in the foreground as children of the test process, started in
the order they need each other (munged, mariadbd, slurmdbd, slurmctld, slurmd) and stopped by
pid in reverse, after every job is cancelled.

Facts the config respects (found by bringing one up by hand): slurmd refuses a ``NodeName``
other than the host's unless started with ``-N``; a ``RealMemory`` above the machine's drains
the node; ``proctrack/linuxproc`` needs no cgroups; ``task/affinity`` pins each job to its
CPUs (torch then takes one thread per CPU it was given); submitit reads job states with
``sacct`` only, which needs accounting (slurmdbd, before slurmctld on a fresh state folder);
munged runs as the ``munge`` user with a key only it can read.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = "slurmctld slurmd slurm-client munge slurmdbd mariadb-server"
PROGRAMS = ("munged", "mungekey", "mariadbd", "mariadb-install-db", "mariadb", "slurmdbd",
            "slurmctld", "slurmd", "sbatch", "sacct", "sinfo", "scontrol", "scancel")
NODE = "lthnode"
CLUSTER = "lthci"
DB_PASSWORD = "lth-ci"  # a throwaway database on a private port, gone with the folder


def missing() -> str | None:
    """Why this machine cannot run the cluster, or None."""
    if os.geteuid() != 0:
        return "the SLURM tests need root (its daemons run as root and as munge)"
    absent = [name for name in PROGRAMS if shutil.which(name) is None]
    try:
        pwd.getpwnam("munge")
    except KeyError:
        absent.append("the munge user")
    if absent:
        return (f"SLURM is not installed ({', '.join(absent)} missing): apt-get install "
                f"{PACKAGES} (.ci/run does)")
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def hardware() -> dict[str, str]:
    """This machine's CPU layout as slurmd sees it (``slurmd -C``), memory at half the
    machine's (a RealMemory above it drains the node)."""
    line = subprocess.run(["slurmd", "-C"], capture_output=True, text=True,
                          check=True).stdout.splitlines()[0]
    layout = dict(item.split("=", 1) for item in line.split())
    keys = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
    return {**{key: layout[key] for key in keys}, "RealMemory": str(int(layout["RealMemory"]) // 2)}


@dataclass
class Cluster:
    """The running cluster: its state folder, the environment its clients need, and the
    daemons (name -> process), started in order."""

    root: Path
    env: dict[str, str]
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        """A SLURM client command against this cluster."""
        return subprocess.run(command, capture_output=True, text=True, env=self.env,
                              check=check, timeout=60)

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def start(self, name: str, command: list[str], user: str | None = None) -> None:
        out = open(self.root / f"{name}.out", "ab")  # noqa: SIM115 (the daemon's lifetime)
        self.daemons[name] = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                              env=self.env, user=user, group=user,
                                              start_new_session=True)
        out.close()

    def wait_for(self, what: str, ready, timeout_s: float = 60.0) -> None:
        """Poll ``ready()`` until true; a daemon that exited or the timeout fails with its log."""
        deadline = time.monotonic() + timeout_s
        while not ready():
            dead = [name for name, proc in self.daemons.items() if proc.poll() is not None]
            if dead or time.monotonic() > deadline:
                name = dead[0] if dead else list(self.daemons)[-1]
                output = (self.root / f"{name}.out").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"SLURM test cluster: {what} not ready ({name} "
                                   f"{'exited' if dead else 'timed out'}):\n{output}\n"
                                   f"{self.log(name)}")
            time.sleep(0.2)

    def answers(self, *command: str) -> bool:
        return self.run(*command, check=False).returncode == 0

    def node_state(self) -> str:
        return self.run("sinfo", "-h", "-n", NODE, "-o", "%T", check=False).stdout.strip()

    def stop(self) -> None:
        """Cancel every job, wait until none is left, then stop the daemons by pid, last
        started first, and remove the state folder; raise if a daemon is still alive."""
        if "slurmctld" in self.daemons and self.daemons["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--user=root", check=False)
            deadline = time.monotonic() + 60
            while (self.run("squeue", "-h", "-o", "%i", check=False).stdout.strip()
                   and time.monotonic() < deadline):
                time.sleep(0.5)
        alive = []
        for name, proc in reversed(self.daemons.items()):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
            try:
                os.kill(proc.pid, 0)
                alive.append(f"{name} ({proc.pid})")
            except ProcessLookupError:
                pass
        if alive:
            raise RuntimeError(f"SLURM test cluster: still running after stop: {alive} "
                               f"(state in {self.root})")
        shutil.rmtree(self.root)


def write_private(path: Path, text: str, owner: str | None = None) -> None:
    path.write_text(text)
    path.chmod(0o600)
    if owner:
        shutil.chown(path, owner, owner)


def start_cluster(root: Path | None = None) -> Cluster:
    """Bring the cluster up in a fresh folder (a new temporary one by default); on any
    failure what was started is stopped again."""
    root = Path(root or tempfile.mkdtemp(prefix="lth-slurm-"))
    root.chmod(0o755)  # munge reaches its own folder through it
    ports = {name: free_port() for name in ("slurmctld", "slurmd", "slurmdbd", "mariadb")}
    munge_dir = root / "munge"
    munge_dir.mkdir()
    munge_dir.chmod(0o755)  # clients reach the socket through it
    shutil.chown(munge_dir, "munge", "munge")
    munge_socket = munge_dir / "munge.socket"
    auth = f"AuthType=auth/munge\nAuthInfo=socket={munge_socket}\n"
    (root / "spool").mkdir()
    (root / "state").mkdir()
    layout = " ".join(f"{key}={value}" for key, value in hardware().items())
    slurm_conf = root / "slurm.conf"
    slurm_conf.write_text(
        f"ClusterName={CLUSTER}\nSlurmctldHost=localhost\n{auth}"
        f"SlurmctldPort={ports['slurmctld']}\nSlurmdPort={ports['slurmd']}\n"
        "SlurmUser=root\nSlurmdUser=root\n"
        f"StateSaveLocation={root / 'state'}\nSlurmdSpoolDir={root / 'spool'}\n"
        f"SlurmctldPidFile={root / 'slurmctld.pid'}\nSlurmdPidFile={root / 'slurmd.pid'}\n"
        f"SlurmctldLogFile={root / 'slurmctld.log'}\nSlurmdLogFile={root / 'slurmd.log'}\n"
        "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/affinity\n"
        "SelectType=select/cons_tres\nSelectTypeParameters=CR_Core\n"
        "SchedulerType=sched/backfill\nReturnToService=2\nMailProg=/bin/true\n"
        "KillWait=5\nMinJobAge=3600\n"
        "AccountingStorageType=accounting_storage/slurmdbd\nMpiDefault=none\n"
        f"AccountingStoragePass={munge_socket}\n"  # the munge that slurmdbd trusts
        f"AccountingStorageHost=localhost\nAccountingStoragePort={ports['slurmdbd']}\n"
        "JobAcctGatherType=jobacct_gather/none\n"
        f"NodeName={NODE} NodeAddr=127.0.0.1 {layout} State=UNKNOWN\n"
        f"PartitionName=debug Nodes={NODE} Default=YES MaxTime=INFINITE State=UP\n")
    write_private(root / "slurmdbd.conf",
                  f"{auth}DbdHost=localhost\nDbdPort={ports['slurmdbd']}\nSlurmUser=root\n"
                  "StorageType=accounting_storage/mysql\nStorageHost=127.0.0.1\n"
                  f"StoragePort={ports['mariadb']}\nStorageUser=slurm\n"
                  f"StoragePass={DB_PASSWORD}\nStorageLoc=slurm_acct_db\n"
                  f"LogFile={root / 'slurmdbd.log'}\nPidFile={root / 'slurmdbd.pid'}\n")
    env = {**os.environ, "SLURM_CONF": str(slurm_conf)}
    cluster = Cluster(root, env)
    try:
        subprocess.run(["mungekey", "--create", f"--keyfile={munge_dir / 'munge.key'}"],
                       check=True, capture_output=True, user="munge", group="munge")
        cluster.start("munged", ["munged", "--foreground", f"--socket={munge_socket}",
                                 f"--key-file={munge_dir / 'munge.key'}",
                                 f"--pid-file={munge_dir / 'munged.pid'}",
                                 f"--log-file={munge_dir / 'munged.log'}",
                                 f"--seed-file={munge_dir / 'munged.seed'}"], user="munge")
        cluster.wait_for("munged", munge_socket.exists)
        datadir = root / "mysql"
        subprocess.run(["mariadb-install-db", "--no-defaults", "--user=root",
                        f"--datadir={datadir}", "--skip-test-db",
                        "--auth-root-authentication-method=socket"],
                       check=True, capture_output=True)
        db_socket = root / "mysql.sock"
        cluster.start("mariadbd", ["mariadbd", "--no-defaults", "--user=root",
                                   f"--datadir={datadir}", f"--socket={db_socket}",
                                   f"--port={ports['mariadb']}", "--bind-address=127.0.0.1",
                                   "--skip-name-resolve", f"--pid-file={root / 'mysql.pid'}",
                                   f"--log-error={root / 'mariadbd.log'}"])
        sql = ["mariadb", "--no-defaults", f"--socket={db_socket}", "-uroot"]
        cluster.wait_for("mariadbd", lambda: subprocess.run(
            [*sql, "-e", "SELECT 1"], capture_output=True).returncode == 0)
        subprocess.run([*sql, "-e", f"CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY "
                                    f"'{DB_PASSWORD}'; GRANT ALL ON slurm_acct_db.* TO "
                                    f"'slurm'@'127.0.0.1';"], check=True, capture_output=True)
        cluster.start("slurmdbd", ["slurmdbd", "-D"])
        cluster.wait_for("slurmdbd", lambda: "slurmdbd version" in cluster.log("slurmdbd"))
        cluster.start("slurmctld", ["slurmctld", "-D", "-i", "-f", str(slurm_conf)])
        cluster.wait_for("slurmctld", lambda: cluster.answers("scontrol", "ping"))
        cluster.start("slurmd", ["slurmd", "-D", "-N", NODE, "-f", str(slurm_conf)])
        cluster.wait_for("the node", lambda: cluster.node_state() == "idle")
        cluster.wait_for("accounting (sacct)", lambda: cluster.answers("sacct", "-n"))
    except BaseException:
        cluster.stop()
        raise
    return cluster
