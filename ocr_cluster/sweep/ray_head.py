"""A private Ray cluster for one SLURM job: its own ports, its own short temp dir per node.

Several cells (and other users' Ray) may share a node, so the head never joins another Ray instance
and every Ray process is stopped by its process group, never with `ray stop` (which kills every Ray on
the machine). A one-node cell's head stays on 127.0.0.1; a multi-node cell's head listens on its node's
address (`node_ip`) and the other nodes join it with `spawn_node`, each with explicit ports and temp dir.

    head = start_head(num_cpus=8)       # or spawn_head(...) then head.wait_ready(); RAY_ADDRESS: head.address
    ...
    head.stop()
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ocr_cluster.ray_defaults import OWN_CLUSTER_ENV, under

# Every Ray process: loopback only, no usage stats, no 30 s drain on SIGTERM.
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
PORT_FLAGS = ("port", "node-manager-port", "object-manager-port", "ray-client-server-port", "metrics-export-port",
              "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port")
# The ports a node joining a head opens (no GCS, client server or dashboard of its own).
NODE_PORT_FLAGS = ("node-manager-port", "object-manager-port", "metrics-export-port", "dashboard-agent-listen-port",
                   "dashboard-agent-grpc-port", "runtime-env-agent-port")
READY_LINE = "Ray runtime started"
# The variable a multi-node job's tasks read the cluster's auth token from (the launcher exports it to sbatch).
TOKEN_VAR = "OCR_CLUSTER_RAY_TOKEN"
# A head needs ~10 s on an idle node, but minutes on one busy with other cells' data loading (seen at a
# load of 30-60 on 2 cores); a cell that gives up too early fails for good.
START_TIMEOUT_S = float(os.environ.get("OCR_CLUSTER_RAY_START_TIMEOUT_S", "600"))


class RayHeadError(RuntimeError):
    """The private head did not come up; the message holds the tail of its log."""


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct free ports on `host` (each socket stays bound until all are picked)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def ray_executable() -> str:
    beside = Path(sys.executable).parent / "ray"  # the venv the launcher (and submitit) runs in
    found = str(beside) if beside.exists() else shutil.which("ray")
    if not found:
        raise RayHeadError(f"no `ray` executable next to {sys.executable} or on PATH")
    return found


@dataclass
class RayHead:
    pid: int
    address: str                # GCS address, for RAY_ADDRESS
    temp_dir: Path
    env: dict[str, str] = field(default_factory=dict)   # what a client of this head needs (auth token)
    log: Path | None = None
    proc: subprocess.Popen | None = None
    role: str = "private Ray head"

    def wait_ready(self, timeout: float | None = None) -> RayHead:
        """Wait until `ray start` says the head is up; RayHeadError (and the head stopped) otherwise."""
        timeout = START_TIMEOUT_S if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc is not None and self.proc.poll() is None:
            if self.log is not None and READY_LINE in self.log.read_text(errors="ignore"):
                return self
            time.sleep(0.3)
        tail = self.log.read_text(errors="ignore")[-1500:] if self.log is not None else ""
        code = self.proc.poll() if self.proc is not None else None
        state = f"exited with {code}" if code is not None else f"not up after {timeout:.0f}s"
        self.stop()
        raise RayHeadError(f"the {self.role} {state}; log tail:\n{tail}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the head's process group, SIGKILL what is left after `timeout`, remove its temp dir."""
        _signal_group(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _group_alive(self.pid):
            time.sleep(0.2)
        _signal_group(self.pid, signal.SIGKILL)
        _reap(self.pid)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _group_alive(pgid: int) -> bool:
    _reap(pgid)
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def cluster_env(node_ip: str, token: str) -> dict[str, str]:
    """What every process of a private cluster (and a client of it) needs: token auth with the cluster's
    own token and, for a cluster on a non-loopback-only address, Ray's multi-node mode. Ray refuses
    `ray start --address` with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0; with 1 it rewrites 127.0.0.1 (never
    other addresses) into the host's interface IP, so multi-node cells never use 127.0.0.1."""
    multi = node_ip != "127.0.0.1"
    return {**RAY_ENV, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1" if multi else "0", "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": token}


def _launch(cmd: list[str], temp_dir: Path, env: dict[str, str]) -> subprocess.Popen:
    log = temp_dir / "ray_start.log"
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _resource_flags(num_cpus: int, num_gpus: int | None, object_store_mb: int) -> list[str]:
    flags = [f"--num-cpus={num_cpus}"]
    if num_gpus is not None:
        flags.append(f"--num-gpus={num_gpus}")
    if object_store_mb:
        flags.append(f"--object-store-memory={object_store_mb * 1024**2}")
    return flags


def spawn_head(num_cpus: int, num_gpus: int | None = None, object_store_mb: int = 0,
               base_env: dict[str, str] | None = None, node_ip: str = "127.0.0.1",
               token: str | None = None) -> RayHead:
    """Start `ray start --head --block` in its own session; `wait_ready()` waits until it is up. `node_ip`
    other than 127.0.0.1: a head other nodes can join (spawn_node), with `token` as the cluster's."""
    temp_dir = Path(tempfile.mkdtemp(prefix="ocrs_", dir="/tmp"))  # unix socket paths must stay < 107 bytes
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS), node_ip)))
    # A token of its own: Ray turns token auth on by itself once ~/.ray/auth_token exists.
    client_env = cluster_env(node_ip, token or secrets.token_hex(32))
    address = f"{node_ip}:{ports['port']}"
    # RAY_ADDRESS for the head's own processes too: Ray Train's actors use the state API, which would
    # otherwise find several Ray instances on a shared node and refuse to pick one.
    env = {**under(base_env if base_env is not None else dict(os.environ), OWN_CLUSTER_ENV), **client_env,
           "RAY_ADDRESS": address}
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    cmd = [ray_executable(), "start", "--head", "--block", f"--node-ip-address={node_ip}",
           *(f"--{flag}={port}" for flag, port in ports.items()), "--include-dashboard=true",
           f"--dashboard-host={node_ip}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
           *_resource_flags(num_cpus, num_gpus, object_store_mb)]
    proc = _launch(cmd, temp_dir, env)
    return RayHead(proc.pid, address, temp_dir, client_env, temp_dir / "ray_start.log", proc)


def spawn_node(head_address: str, node_ip: str, token: str, num_cpus: int, num_gpus: int | None = None,
               object_store_mb: int = 0, base_env: dict[str, str] | None = None) -> RayHead:
    """Join the head at `head_address` from this node (`ray start --address --block` in its own session,
    on `node_ip`, with explicit ports and temp dir); `wait_ready()` waits until it has joined. The
    returned RayHead's address is the head's."""
    temp_dir = Path(tempfile.mkdtemp(prefix="ocrn_", dir="/tmp"))
    ports = dict(zip(NODE_PORT_FLAGS, free_ports(len(NODE_PORT_FLAGS), node_ip)))
    client_env = cluster_env(node_ip, token)
    env = {**under(base_env if base_env is not None else dict(os.environ), OWN_CLUSTER_ENV), **client_env,
           "RAY_ADDRESS": head_address}
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    cmd = [ray_executable(), "start", f"--address={head_address}", "--block", f"--node-ip-address={node_ip}",
           *(f"--{flag}={port}" for flag, port in ports.items()), f"--temp-dir={temp_dir}",
           "--disable-usage-stats", *_resource_flags(num_cpus, num_gpus, object_store_mb)]
    proc = _launch(cmd, temp_dir, env)
    return RayHead(proc.pid, head_address, temp_dir, client_env, temp_dir / "ray_start.log", proc,
                   role=f"Ray node {node_ip}")


def start_head(num_cpus: int, num_gpus: int | None = None, object_store_mb: int = 0, timeout: float | None = None,
               base_env: dict[str, str] | None = None) -> RayHead:
    """spawn_head, then wait until the head is up."""
    return spawn_head(num_cpus, num_gpus, object_store_mb, base_env).wait_ready(timeout)
