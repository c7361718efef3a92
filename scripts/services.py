"""Real local services for tests and CI: a Ray head, an S3 endpoint and a two-node SLURM cluster on this host.

Each runs on 127.0.0.1 only, on free ports, with state in a short temporary directory, and is stopped
by the PIDs this module started (never `ray stop`, which would kill every Ray on the machine).

    python scripts/services.py up ray|s3|slurm   # start one, print its environment, wait for Ctrl-C
                                                 # (or SIGTERM / SIGHUP), then stop it

tests/conftest.py imports this module and starts each service once per test session, on demand.
"""

from __future__ import annotations

import getpass
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ocr_cluster.sweep.ray_head import free_ports  # the one helper a SLURM task's private head uses too

VENV_BIN = Path(sys.executable).parent
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
S3_BUCKET = "ocr-test"


class ServiceUnavailable(RuntimeError):
    """A service could not be started; the message says why."""


@dataclass
class Service:
    name: str
    env: dict[str, str]
    pids: list[int] = field(default_factory=list)
    workdir: Path | None = None
    info: dict[str, str] = field(default_factory=dict)
    own_process_groups: bool = True
    marker: str = ""  # processes whose command line holds this (our unique config path) are ours too
    drain: Callable[[], None] | None = None  # run first: what the daemons must end while they still can

    def stop(self, timeout: float = 20.0) -> None:
        if self.drain:
            try:
                self.drain()
            except Exception as exc:  # noqa: BLE001 - stopping the daemons must still happen
                print(f"services.py: {self.name}: {exc}", file=sys.stderr)
        if self.marker:
            self.pids = list(dict.fromkeys([*self.pids, *_pids_with_arg(self.marker)]))
        for pid in self.pids:
            _signal(pid, signal.SIGTERM, self.own_process_groups)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(_alive(p) for p in self.pids):
            time.sleep(0.2)
        for pid in self.pids:
            if _alive(pid):
                _signal(pid, signal.SIGKILL, self.own_process_groups)
        if self.workdir and self.workdir.exists():
            shutil.rmtree(self.workdir, ignore_errors=True)


def _signal(pid: int, sig: int, group: bool) -> None:
    try:
        os.killpg(pid, sig) if group else os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _pids_with_arg(text: str) -> list[int]:
    """PIDs of processes with `text` in their command line (daemons that forked away from us)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if text in proc.joinpath("cmdline").read_bytes().decode(errors="ignore"):
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass  # not our child (a daemon): fall back to signal 0
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in _proc_state(pid)


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return ""


def free_port() -> int:
    return free_ports(1)[0]


def _wait(check, timeout: float, what: str, log: Path | None = None, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        try:
            result = check()
            if result:
                return result
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            last_error = exc
        time.sleep(0.3)
    tail = log.read_text()[-2000:] if log and log.exists() else ""
    state = f"exited with {proc.returncode}" if proc is not None and proc.poll() is not None else "timed out"
    raise ServiceUnavailable(f"{what} {state} after {timeout:.0f}s (last error: {last_error}); log tail:\n{tail}")


def _short_tempdir(prefix: str) -> Path:
    # Ray's unix sockets live under its temp dir, and socket paths must stay under 107 bytes.
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


# ---------------------------------------------------------------------------------------------
# Ray


def start_ray(num_cpus: int = 4, object_store_mb: int = 400, python: str | Path | None = None,
              node_env: dict[str, str] | None = None) -> Service:
    """A Ray head on 127.0.0.1. By default it runs this venv's `ray`. With `python`, the head and every
    worker run that interpreter instead, from a temp dir, without PYTHONPATH and with its bin directory
    first on PATH, as on a fresh cluster node (tests/test_job_shipping.py gives it a venv without this
    package). `node_env` adds variables to the head's environment, as a node's own credentials."""
    # Logical CPUs above the machine's 2: a 2-worker TorchTrainer must leave CPUs for Ray Data's
    # read/map tasks, or the pipeline waits forever on its resource budget.
    bin_dir = Path(python).parent if python else VENV_BIN
    ray_cmd = [str(python), "-m", "ray.scripts.scripts"] if python else [str(VENV_BIN / "ray")]
    if not Path(ray_cmd[0]).exists():
        raise ServiceUnavailable(f"no {ray_cmd[0]}; run `make venv`")
    workdir = _short_tempdir("ocr_ray_")
    gcs_port, dashboard_port, agent_port, client_port, metrics_port = free_ports(5)
    # Ray >= 2.5x turns token auth on by itself once ~/.ray/auth_token exists (any local ray.init()
    # writes one). Run the test head with auth on, as users' clusters are, and a token of its own.
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env = {**os.environ, **(node_env or {}), **RAY_ENV, **auth, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", *(("PYTHONPATH",) if python else ())):
        env.pop(key, None)
    cmd = [*ray_cmd, "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           f"--port={gcs_port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dashboard_port}", f"--dashboard-agent-listen-port={agent_port}",
           f"--ray-client-server-port={client_port}", f"--metrics-export-port={metrics_port}",
           f"--num-cpus={num_cpus}", f"--object-store-memory={object_store_mb * 1024**2}",
           f"--temp-dir={workdir}", "--disable-usage-stats"]
    log = workdir / "ray_start.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=workdir if python else None)
    service = Service("ray", {}, [proc.pid], workdir)
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    probe = urllib.request.Request(f"{dashboard}/api/version",
                                   headers={"Authorization": f"Bearer {auth['RAY_AUTH_TOKEN']}"})
    try:
        # The job server answering is the last thing to come up; `ray job submit` needs it.
        _wait(lambda: urllib.request.urlopen(probe, timeout=2).status == 200, 90, "Ray head", log, proc)
    except BaseException:
        service.stop()
        raise
    service.env = {**RAY_ENV, **auth}  # clients (ray job submit, ray.init) need the token
    service.info = {"address": f"127.0.0.1:{gcs_port}", "dashboard_url": dashboard, "temp_dir": str(workdir)}
    return service


# ---------------------------------------------------------------------------------------------
# S3 (moto's server, as s3fs's own tests use)


def start_s3(bucket: str = S3_BUCKET, enforce_auth: bool = False) -> Service:
    """moto's S3 on 127.0.0.1 with `bucket`. With enforce_auth, every request after the bucket's creation
    must be signed with credentials moto's IAM knows: the test endpoint for wrong credentials."""
    moto_bin = VENV_BIN / "moto_server"
    if not moto_bin.exists():
        raise ServiceUnavailable(f"no moto_server at {moto_bin}; run `make venv`")
    workdir = _short_tempdir("ocr_s3_")
    port = free_port()
    log = workdir / "moto.log"
    # The readiness probe and create_bucket are the two requests let through before auth applies.
    env = {**os.environ, **({"INITIAL_NO_AUTH_ACTION_COUNT": "2"} if enforce_auth else {})}
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(moto_bin), "-H", "127.0.0.1", "-p", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, env=env)
    service = Service("s3", {}, [proc.pid], workdir)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        _wait(lambda: urllib.request.urlopen(f"{endpoint}/", timeout=2).status == 200, 30, "moto S3 server",
              log, proc)
        import boto3  # moto depends on it

        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket=bucket)
    except BaseException:
        service.stop()
        raise
    service.env = env
    service.info = {"endpoint_url": endpoint, "bucket": bucket}
    return service


# ---------------------------------------------------------------------------------------------
# SLURM (Debian's slurmctld/slurmd/munge; installed by scripts/install_slurm.sh)

SLURM_CONF = """\
ClusterName=ocrtest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort={ctld_port}
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/slurmd/%n
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd.%n.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
InactiveLimit=0
KillWait=5
MinJobAge=300
# A requeued job may start again once its step credential expires (default 120 s): 30 s keeps tests short.
AuthInfo=cred_expire=30
# Both nodes are this host: each takes its configured share of the CPUs and memory, not what it detects.
SlurmdParameters=config_overrides
{nodes}PartitionName=debug Nodes={node_list} Default=YES MaxTime=INFINITE State=UP
"""


def _munge_works() -> bool:
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=5, check=True).stdout
        subprocess.run(["unmunge"], input=cred, capture_output=True, timeout=5, check=True)
        return True
    except (OSError, subprocess.SubprocessError):
        return False


def _start_munge() -> int | None:
    """Start munged unless one already answers; return the PID if this call started it."""
    if _munge_works():
        return None
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
    run_dir = Path("/run/munge")
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.chown(run_dir, "munge", "munge")
    pidfile = run_dir / "munged.pid"
    subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged", "--force"], check=True,
                   capture_output=True, timeout=20)
    _wait(_munge_works, 15, "munged")
    return int(pidfile.read_text().strip()) if pidfile.exists() else None


# The test cluster's nodes: two slurmd daemons on this host (Debian's slurmd is built for several per host),
# each with its own loopback address, which multi-node cells give their Ray node (see SWEEPS.md §3).
SLURM_NODES = (("n1", "127.0.0.2"), ("n2", "127.0.0.3"))


def multiple_slurmd(run_env: dict[str, str]) -> bool:
    """Whether this slurmd build runs several daemons per host (`scontrol show config`: MULTIPLE_SLURMD)."""
    out = subprocess.run(["scontrol", "show", "config"], env=run_env, capture_output=True, text=True, timeout=30)
    return any(line.split("=", 1)[0].strip() == "MULTIPLE_SLURMD" and line.split("=", 1)[1].strip() == "Yes"
               for line in out.stdout.splitlines() if "=" in line)


def start_slurm() -> Service:
    """slurmctld and two slurmd nodes (n1, n2) on this host, one partition over both. The nodes split the
    host's CPUs (at least one each) and most of its memory; each has a port of its own and its own
    loopback address as NodeAddr."""
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "sinfo", "munged", "munge") if not shutil.which(b)
               and not Path(f"/usr/sbin/{b}").exists()]
    if missing:
        raise ServiceUnavailable(f"SLURM is not installed (missing {', '.join(missing)}); "
                                 "run `bash scripts/install_slurm.sh` as root")
    if os.geteuid() != 0:
        raise ServiceUnavailable("the test SLURM cluster needs root (slurmd runs jobs as their user)")
    state = _short_tempdir("ocr_slurm_")
    (state / "ctld").mkdir()
    for name, _ in SLURM_NODES:
        (state / "slurmd" / name).mkdir(parents=True)
    host = socket.gethostname().split(".")[0]
    mem_kb = int(next(line for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal")).split()[1])
    conf = state / "slurm.conf"
    ctld_port, *node_ports = free_ports(1 + len(SLURM_NODES))
    cpus, mem_mb = max(1, (os.cpu_count() or 1) // len(SLURM_NODES)), int(mem_kb / 1024 * 0.85 / len(SLURM_NODES))
    nodes = "".join(f"NodeName={name} NodeHostname={host} NodeAddr={addr} Port={port} CPUs={cpus} "
                    f"RealMemory={mem_mb} State=UNKNOWN\n"
                    for (name, addr), port in zip(SLURM_NODES, node_ports))
    conf.write_text(SLURM_CONF.format(host=host, ctld_port=ctld_port, state=state, nodes=nodes,
                                      node_list=",".join(name for name, _ in SLURM_NODES)))
    env = {"SLURM_CONF": str(conf)}
    run_env = {**os.environ, **env}
    service = Service("slurm", env, [], state, own_process_groups=False, marker=str(conf),
                      drain=lambda: _cancel_jobs(run_env))
    try:
        munged = _start_munge()
        if munged:
            service.pids.append(munged)
        daemons = [("slurmctld", [], "slurmctld"), *(("slurmd", ["-N", name], f"slurmd.{name}")
                                                     for name, _ in SLURM_NODES)]
        for daemon, args, stem in daemons:
            result = subprocess.run([daemon, "-f", str(conf), *args], env=run_env, capture_output=True, text=True,
                                    timeout=30)
            log = state / f"{stem}.log"
            if result.returncode != 0:
                detail = (result.stderr or (log.read_text()[-1500:] if log.exists() else "")).strip()
                raise ServiceUnavailable(f"{daemon} {' '.join(args)} failed to start: {detail}")
            pidfile = state / f"{stem}.pid"
            pid = _wait(lambda: pidfile.exists() and pidfile.read_text().strip(), 15, f"{stem} pid file", log)
            service.pids.insert(0, int(pid))
            if daemon == "slurmctld" and not multiple_slurmd(run_env):  # asks the controller
                raise ServiceUnavailable("this slurmd is not built with multiple-slurmd support (scontrol show "
                                         "config: MULTIPLE_SLURMD), so one host cannot run the two test nodes")

        def nodes_idle() -> bool:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=run_env, capture_output=True, text=True,
                                 timeout=10).stdout.split()
            return len(out) == len(SLURM_NODES) and all(s.rstrip("*") in ("idle", "mixed", "allocated") for s in out)

        _wait(nodes_idle, 60, "SLURM nodes to become idle", state / "slurmctld.log")
    except BaseException:
        service.stop()
        raise
    service.info = {"partition": "debug", "conf": str(conf), "host": host,
                    "nodes": ",".join(f"{name}={addr}" for name, addr in SLURM_NODES)}
    return service


def _cancel_jobs(run_env: dict[str, str], timeout: float = 20.0) -> None:
    """Cancel every job of the test cluster and wait for its steps to end: a job step's slurmstepd outlives
    the daemons (its command line names neither our config nor our directory), so a job still running at
    stop time would be left behind."""
    def queued() -> list[str]:
        return subprocess.run(["squeue", "-h", "-o", "%i"], env=run_env, capture_output=True, text=True,
                              timeout=10).stdout.split()

    if not queued():
        return
    subprocess.run(["scancel", "--user", getpass.getuser()], env=run_env, capture_output=True, timeout=10)
    deadline = time.monotonic() + timeout
    while queued() and time.monotonic() < deadline:
        time.sleep(0.5)


STARTERS = {"ray": start_ray, "s3": start_s3, "slurm": start_slurm}


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "up" or argv[1] not in STARTERS:
        print(f"usage: python scripts/services.py up {{{','.join(STARTERS)}}}", file=sys.stderr)
        return 2
    # `kill` (SIGTERM, how scripts stop a background job) and a closed terminal (SIGHUP) clean up as
    # Ctrl-C does; without this they would leave the service and its temp dir behind.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    try:
        service = STARTERS[argv[1]]()  # a starter interrupted half-way stops what it started
    except ServiceUnavailable as exc:
        print(f"services.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    try:
        print(json.dumps({"env": service.env, "info": service.info, "pids": service.pids,
                          "workdir": str(service.workdir) if service.workdir else None}, indent=2), flush=True)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a second signal must not cut the stop short
            signal.signal(sig, signal.SIG_IGN)
        service.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
