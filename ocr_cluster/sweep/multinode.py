"""The rendezvous of a multi-node cell: one SLURM job, one task per node, one private Ray cluster.

Task 0 (SLURM_PROCID 0) starts the head on its node's address and publishes that address in a file of
the submitit folder (which the nodes share); the other tasks join it (`ray start --address --block`),
mark that they joined, and stay until task 0 marks the attempt done. The cluster's auth token never
touches a file: the launcher exports it (TOKEN_VAR) in the environment sbatch passes to every task.
File names hold the job's restart count, so a requeued attempt never reads the last attempt's head.

A node whose Ray dies while the driver runs (its raylet killed, say) starts again and rejoins, so Ray
Train can restart its worker group on it; when the head is gone for good the node stops.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ocr_cluster.sweep.ray_head import TOKEN_VAR, RayHead, RayHeadError, spawn_node

JOIN_TIMEOUT_S = 300.0    # all nodes joined the head, after it is up
HEAD_GONE_S = 60.0        # a joined node gives up once the head's GCS port has refused it this long
MAX_REJOINS = 5


class RendezvousError(RuntimeError):
    """The nodes did not form the cell's cluster; the message is one line."""


def num_nodes() -> int:
    return int(os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or 1)


def rank() -> int:
    return int(os.environ.get("SLURM_PROCID") or 0)


def node_ip() -> str:
    """This node's address for Ray: its SLURM NodeAddr (scontrol show node), else its hostname, resolved.
    127.0.0.1 is refused: Ray rewrites it into the host's interface IP when nodes join."""
    name = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    addr = name
    try:
        out = subprocess.run(["scontrol", "show", "node", "-o", name], capture_output=True, text=True, timeout=30)
        found = re.search(r"\bNodeAddr=(\S+)", out.stdout)
        addr = found.group(1) if found else name
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        ip = socket.gethostbyname(addr)
    except OSError as exc:
        raise RendezvousError(f"cannot resolve node {name}'s address {addr!r}: {exc}") from None
    if ip == "127.0.0.1":
        raise RendezvousError(f"node {name}'s address {addr!r} resolves to 127.0.0.1, which Ray cannot use for "
                              f"several nodes; give the node a routable NodeAddr")
    return ip


def token() -> str:
    value = os.environ.get(TOKEN_VAR, "")
    if not value:
        raise RendezvousError(f"{TOKEN_VAR} is not set in the job's environment (the launcher exports it); "
                              f"the nodes cannot share the cluster's auth token")
    return value


@dataclass
class Rendezvous:
    """The attempt's files in the submitit folder."""
    folder: Path
    job_id: str
    restarts: str
    nodes: int

    def _path(self, what: str) -> Path:
        return self.folder / f"{self.job_id}_r{self.restarts}_{what}"

    @property
    def head_file(self) -> Path:
        return self._path("ray_head")

    @property
    def done_file(self) -> Path:
        return self._path("ray_done")

    def joined_file(self, node_rank: int) -> Path:
        return self._path(f"ray_node{node_rank}_joined")

    def failed_file(self, node_rank: int) -> Path:
        return self._path(f"ray_node{node_rank}_failed")

    def publish_head(self, address: str) -> None:
        tmp = self.head_file.with_suffix(".tmp")
        tmp.write_text(address)
        tmp.replace(self.head_file)

    def mark_done(self) -> None:
        self.done_file.write_text("done\n")

    def wait_joined(self, stopped: threading.Event, timeout: float = JOIN_TIMEOUT_S) -> float:
        """Wait until every other node marked that it joined; seconds waited, RendezvousError on timeout."""
        start = time.monotonic()
        others = range(1, self.nodes)
        while not all(self.joined_file(r).exists() for r in others):
            if stopped.is_set():
                raise RendezvousError("stopped while waiting for the nodes to join")
            failed = [f for f in map(self.failed_file, others) if f.exists()]
            if failed:
                raise RendezvousError(failed[0].read_text().strip())
            if time.monotonic() - start > timeout:
                missing = [str(r) for r in others if not self.joined_file(r).exists()]
                raise RendezvousError(f"node task(s) {', '.join(missing)} of {self.nodes} did not join the cell's "
                                      f"Ray head within {timeout:.0f}s")
            time.sleep(0.5)
        return time.monotonic() - start

    def head_address(self, stopped: threading.Event) -> str | None:
        """The head's address once task 0 published it; None when the attempt ended first."""
        while not self.head_file.exists():
            if stopped.is_set() or self.done_file.exists():
                return None
            time.sleep(0.5)
        return self.head_file.read_text().strip()


def _reachable(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=3):
            return True
    except OSError:
        return False


def join_until_done(rdv: Rendezvous, node_rank: int, num_cpus: int, num_gpus: int | None, base_env: dict[str, str],
                    stopped: threading.Event, register: Callable[[RayHead | None], None]) -> int:
    """A non-head task: join the head, mark it, stay until the attempt is done; rejoin when this node's Ray
    dies meanwhile. Returns how many times it rejoined; RendezvousError when it cannot join at all."""
    address = rdv.head_address(stopped)
    if address is None:
        return 0
    ip, secret = node_ip(), token()
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        raise RendezvousError(f"node address {ip!r} is not an IP address") from None
    rejoins, joined, gone_since = 0, False, None
    while not (stopped.is_set() or rdv.done_file.exists()):
        node = spawn_node(address, ip, secret, num_cpus, num_gpus, base_env=base_env)
        register(node)
        print(f"Ray node {ip} joining head {address}, temp dir {node.temp_dir}", flush=True)
        try:
            node.wait_ready()
        except RayHeadError as exc:
            register(None)
            print(exc, flush=True)  # with Ray's log tail; its temp dir is gone
            if stopped.is_set() or rdv.done_file.exists():
                break
            if rejoins >= MAX_REJOINS or not _reachable(address):
                why = (f"node task {node_rank} could not join the cell's Ray head {address}: "
                       f"{str(exc).splitlines()[0].removesuffix('; log tail:')}")
                if not joined:
                    rdv.failed_file(node_rank).write_text(why + "\n")  # the head stops waiting for it
                raise RendezvousError(why) from None
            rejoins += 1
            time.sleep(2)
            continue
        if not joined:
            rdv.joined_file(node_rank).write_text(f"{ip}\n")
            joined = True
        print(f"Ray node {ip} joined head {address}", flush=True)
        while node.proc.poll() is None and not (stopped.is_set() or rdv.done_file.exists()):
            if _reachable(address):
                gone_since = None
            else:
                gone_since = gone_since or time.monotonic()
                if time.monotonic() - gone_since > HEAD_GONE_S:
                    print(f"the cell's Ray head {address} is gone; stopping this node", flush=True)
                    node.stop()
                    register(None)
                    return rejoins
            time.sleep(1)
        died = node.proc.poll() is not None
        node.stop()
        register(None)
        if died and not (stopped.is_set() or rdv.done_file.exists()):
            if rejoins >= MAX_REJOINS:
                raise RendezvousError(f"this node's Ray exited {rejoins + 1} times; giving up")
            rejoins += 1
            print(f"this node's Ray exited (code {node.proc.returncode}) while the driver runs; rejoining "
                  f"({rejoins}/{MAX_REJOINS})", flush=True)
    return rejoins
