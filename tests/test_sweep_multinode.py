"""Multi-node cells on the real two-node SLURM cluster (n1 on 127.0.0.2, n2 on 127.0.0.3, one host): one job of
two tasks forms one private Ray cluster, Ray Train spreads its two workers over both nodes, and the row
says num_nodes 2; a node whose raylet is killed mid-run rejoins and the cell still completes.

Throughout each run every TCP/UDP socket of the job's processes (found by OCR_CLUSTER_JOB_ID in their
environment: tasks, Ray daemons, driver, workers) is checked: none may touch an address outside
127.0.0.0/8 (Ray rewrites 127.0.0.1 into the host's interface IP; the cells must never dial it).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from test_sweep_slurm import REPO, attempts, files_text, launch, states, submitted, tiny_synth, write_grid

pytestmark = [pytest.mark.slurm, pytest.mark.s3, pytest.mark.timeout(600)]
TOKEN = "multinode-test-token-" + os.urandom(8).hex()


@pytest.fixture(scope="module")
def synth_uri(_s3_service):
    return tiny_synth(_s3_service, "sweep-multinode")


@pytest.fixture
def cluster(slurm, s3, monkeypatch):
    """The submitting shell, with the launch's Ray token set here so that the test can ask the cell's
    cluster (the launcher keeps a token it finds; it never writes it to a file)."""
    monkeypatch.setenv("OCR_CLUSTER_RAY_TOKEN", TOKEN)
    return slurm


# --------------------------------------------------------------------------------------------------
# Sockets of a job's processes


def _job_pids(job_id: str) -> list[int]:
    """Every process whose environment says it belongs to this SLURM cell (CellTask exports it)."""
    needle = f"OCR_CLUSTER_JOB_ID={job_id}\0".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if needle in proc.joinpath("environ").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def _addr(hex_addr: str) -> str:
    host, port = hex_addr.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        return f"{socket.inet_ntop(socket.AF_INET, raw[::-1])}:{int(port, 16)}"
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    return f"[{socket.inet_ntop(socket.AF_INET6, words)}]:{int(port, 16)}"


def _loopback_or_any(addr: str) -> bool:
    host = addr.rsplit(":", 1)[0].strip("[]")
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_unspecified or ip in ipaddress.ip_network("127.0.0.0/8") or ip == ipaddress.ip_address("::1")


def outside_loopback(pids: list[int]) -> list[str]:
    """'pid cmd local -> remote' for each TCP/UDP socket of `pids` with an address outside 127.0.0.0/8
    (a wildcard listener, 0.0.0.0 or ::, touches no address and is allowed)."""
    table: dict[str, tuple[str, str]] = {}
    for name in ("tcp", "tcp6", "udp", "udp6"):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            table[parts[9]] = (_addr(parts[1]), _addr(parts[2]))
    bad = []
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore")[:80]
        except OSError:
            continue
        links = []
        for fd in fds:
            try:
                links.append(os.readlink(fd))
            except OSError:  # closed meanwhile
                continue
        for link in links:
            inode = link[len("socket:["):-1] if link.startswith("socket:[") else None
            if inode in table:
                local, remote = table[inode]
                if not (_loopback_or_any(local) and _loopback_or_any(remote)):
                    bad.append(f"{pid} {cmd!r} {local} -> {remote}")
    return bad


def test_the_socket_check_can_fail():
    """outside_loopback flags a socket connected outside 127.0.0.0/8 (no packet is sent: UDP connect)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(("192.0.2.1", 9))  # TEST-NET-1
        assert any("192.0.2.1:9" in line for line in outside_loopback([os.getpid()]))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(("127.0.0.3", 9))
        assert not outside_loopback([os.getpid()])


# --------------------------------------------------------------------------------------------------
# Watching a running cell


STATE_PROBE = """
import json, sys, time
from ray.util.state import list_actors, list_nodes
address, want = sys.argv[1], int(sys.argv[2])
deadline = time.time() + float(sys.argv[3])
while time.time() < deadline:
    try:
        workers = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker"),
                                                        ("state", "=", "ALIVE")], raise_on_missing_output=False)
        if len(workers) >= want:
            nodes = {n.node_id: n.node_ip for n in list_nodes(address=address, raise_on_missing_output=False)}
            print(json.dumps([nodes.get(w.node_id, w.node_id) for w in workers]))
            sys.exit(0)
    except Exception as exc:
        print(repr(exc)[:300], file=sys.stderr)
    time.sleep(1)
sys.exit(1)
"""


class Watch:
    """Polls a launched cell: its sockets (every second), its log folder, its Ray state (once the head is up)."""

    def __init__(self, folder: Path, job_id: str):
        self.folder, self.job_id = folder, job_id
        self.bad: list[str] = []
        self.pids_seen: set[int] = set()
        self.probe: subprocess.Popen | None = None

    def head_address(self) -> str | None:
        heads = sorted(self.folder.rglob(f"{self.job_id}_r*_ray_head"))
        return heads[-1].read_text().strip() if heads else None

    def tick(self) -> None:
        pids = _job_pids(self.job_id)
        self.pids_seen.update(pids)
        self.bad += outside_loopback(pids)
        address = self.head_address()
        if self.probe is None and address:
            dashboard_env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN,
                             "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
            dashboard_env.pop("RAY_ADDRESS", None)
            self.probe = subprocess.Popen([sys.executable, "-c", STATE_PROBE, address, "2", "300"], env=dashboard_env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def worker_ips(self) -> list[str]:
        assert self.probe is not None, "the head's address was never published"
        out, err = self.probe.communicate(timeout=120)
        assert self.probe.returncode == 0, f"Ray's state API never showed 2 live RayTrainWorkers: {err[-1500:]}"
        return json.loads(out)


def wait_done(cli, grid: Path, watch: Watch, timeout: float, on_tick=None) -> dict:
    """Poll `sweep status` until the cell ends; meanwhile a thread ticks the watch (and `on_tick`) twice a
    second, so that nothing is missed while the status command runs."""
    done = threading.Event()
    errors: list[BaseException] = []

    def ticker() -> None:
        while not done.is_set():
            try:
                watch.tick()
                if on_tick:
                    on_tick()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
                errors.append(exc)
                return
            time.sleep(0.5)

    thread = threading.Thread(target=ticker, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    try:  # until SLURM no longer has the job (an overloaded squeue that fails or times out is asked again)
        while not errors:
            queued = subprocess.run(["squeue", "-h", "-j", watch.job_id], capture_output=True, text=True, timeout=120)
            if queued.returncode == 0 and not queued.stdout.strip():
                break
            assert time.monotonic() < deadline, f"job {watch.job_id} still queued after {timeout:.0f}s"
            time.sleep(2)
    finally:
        done.set()
        thread.join(timeout=30)
    if errors:
        raise errors[0]
    return next(iter(states(cli, grid).values()))


def assert_nothing_left(folder: Path, job_id: str) -> None:
    """No process of the job and none of its Ray temp dirs remain (the tasks stop Ray by PID)."""
    text = files_text(folder)
    temp_dirs = re.findall(r"temp dir (/tmp/ocr[sn]_\w+)", text)
    assert len(set(temp_dirs)) >= 2, "the log names no head and node temp dirs"
    deadline = time.monotonic() + 60
    while _job_pids(job_id) or any(Path(d).exists() for d in temp_dirs):
        assert time.monotonic() < deadline, (_job_pids(job_id), [d for d in temp_dirs if Path(d).exists()])
        time.sleep(1)


def _probe_head(ray_cluster) -> int:
    request = urllib.request.Request(f"{ray_cluster.dashboard_url}/api/version",
                                     headers={"Authorization": f"Bearer {ray_cluster.env['RAY_AUTH_TOKEN']}"})
    return urllib.request.urlopen(request, timeout=10).status


# --------------------------------------------------------------------------------------------------


def test_two_node_cell_spreads_workers_and_leaves_nothing(cluster, s3, synth_uri, cli, tmp_path, ray_cluster):
    root = s3.url("multi")
    store = f"{root}/results"
    folder = tmp_path / "submitit"
    grid = write_grid(tmp_path / "multi.yaml", root, synth_uri, cluster, iters=(10,), name="multi", nodes=2,
                      checkpoint_interval=5)
    text = grid.read_text().replace("num_workers: 1", "num_workers: 2")
    grid.write_text(text)
    assert _probe_head(ray_cluster) == 200

    first = launch(cli, grid, folder)
    assert first.returncode == 0, first.stdout + first.stderr
    (run_id, job_id), = submitted(first.stdout).items()
    watch = Watch(folder, job_id)
    cell = wait_done(cli, grid, watch, timeout=420)
    log = files_text(folder)
    assert cell["state"] == "completed", (cell, log[-4000:])

    ips = watch.worker_ips()  # Ray's state API while the workers ran
    assert sorted(ips) == ["127.0.0.2", "127.0.0.3"], ips
    assert "all 2 nodes joined the cell's Ray cluster" in log
    rows = attempts(store, run_id)
    assert [(r["status"], r["num_nodes"]) for r in rows] == [("completed", 2)], rows
    assert watch.pids_seen and not watch.bad, watch.bad
    assert TOKEN not in log and TOKEN not in json.dumps(rows, default=str)
    assert_nothing_left(folder, job_id)
    assert _probe_head(ray_cluster) == 200  # the session's other Ray head is untouched


def test_node_lost_mid_run_rejoins_and_the_cell_completes(cluster, s3, synth_uri, cli, tmp_path):
    root = s3.url("lost")
    store = f"{root}/results"
    folder = tmp_path / "submitit"
    grid = write_grid(tmp_path / "lost.yaml", root, synth_uri, cluster, iters=(24,), name="lost", nodes=2,
                      checkpoint_interval=4)
    grid.write_text(grid.read_text().replace("num_workers: 1", "num_workers: 2"))
    first = launch(cli, grid, folder)
    assert first.returncode == 0, first.stdout + first.stderr
    (run_id, job_id), = submitted(first.stdout).items()
    watch = Watch(folder, job_id)
    killed: list[int] = []

    def kill_node_raylet() -> None:
        """Once the workers train, SIGKILL the raylet of the node that is not the head."""
        if killed or not re.search(r"\] iter \d+/\d+ \|", files_text(folder)):
            return
        node_dirs = re.findall(r"Ray node 127\.0\.0\.3 joining head \S+, temp dir (\S+)", files_text(folder))
        raylets = [pid for pid in _job_pids(job_id) if node_dirs and _is_raylet_of(pid, node_dirs[-1])]
        for pid in raylets:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    cell = wait_done(cli, grid, watch, timeout=480, on_tick=kill_node_raylet)
    log = files_text(folder)
    assert killed, "the second node's raylet was never found running"
    assert cell["state"] == "completed", (cell, log[-4000:])
    assert "rejoining (1/" in log, log[-4000:]
    rows = attempts(store, run_id)
    assert [r["status"] for r in rows] == ["completed"], rows
    assert not watch.bad, watch.bad
    assert_nothing_left(folder, job_id)


def _is_raylet_of(pid: int, temp_dir: str) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="ignore")
    except OSError:
        return False
    return "raylet" in cmd.split("\0")[0] and temp_dir in cmd


@pytest.mark.parametrize("use_gpu, workers, slurm, message", [
    (True, 6, {"nodes": 2, "gpus_per_node": 4}, "cluster.num_workers 6 must be backend.slurm.nodes 2 x gpus_per_node 4 = 8"),
    (True, 6, {"nodes": 0, "gpus_per_node": 4}, "cluster.num_workers 6 must be backend.slurm.nodes 2 x gpus_per_node 4 = 8"),
    (True, 8, {"nodes": 1, "gpus_per_node": 4}, "needs more GPUs than one node's backend.slurm.gpus_per_node 4"),
    (False, 3, {"nodes": 2, "gpus_per_node": 0}, "cluster.num_workers 3 does not spread evenly over backend.slurm.nodes 2"),
], ids=["gpu-mismatch", "gpu-auto-uneven", "gpu-one-node", "cpu-uneven"])
def test_workers_must_fit_the_nodes(cli, tmp_path, use_gpu, workers, slurm, message):
    """Refused before SLURM is asked: one line, exit 2."""
    grid = tmp_path / "g.yaml"
    grid.write_text(json.dumps({"name": "shape", "base": str(REPO / "jobs/quickstart.yaml"),
                                "set": {"cluster": {"num_workers": workers, "use_gpu": use_gpu}, "data": {"batch_size": 24}},
                                "backend": {"slurm": slurm}}))
    out = cli("sweep", "launch", str(grid), "--dry-run", "--folder", str(tmp_path / "f"))
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_multi_node_shapes_and_sbatch_parameters(tmp_path):
    """nodes x gpus_per_node GPU workers become one job of `nodes` tasks; a CPU cell's workers are spread."""
    from ocr_cluster.sweep.grid import load
    from ocr_cluster.sweep.launch import cell_yaml, parameters, shape_of

    def grid(use_gpu, workers, **slurm):
        path = tmp_path / f"g{use_gpu}.yaml"
        path.write_text(json.dumps({"name": "s", "base": str(REPO / "jobs/quickstart.yaml"),
                                    "set": {"cluster": {"num_workers": workers, "use_gpu": use_gpu}, "data": {"batch_size": 24}},
                                    "backend": {"slurm": slurm}}))
        return load(path)

    g = grid(True, 8, nodes=0, gpus_per_node=4)
    (cell,) = g.cells()
    shape = shape_of(cell, g)
    assert (shape.nodes, shape.gpus) == (2, 4)
    params = parameters(g, shape, 1)
    assert (params["nodes"], params["ntasks_per_node"], params["gpus_per_node"]) == (2, 1, 4)
    assert "placement_strategy: PACK" in cell_yaml(cell, shape)
    g = grid(False, 2, nodes=2, gpus_per_node=0)
    (cell,) = g.cells()
    assert "placement_strategy: SPREAD" in cell_yaml(cell, shape_of(cell, g))
