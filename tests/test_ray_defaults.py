"""The clusters ocr_cluster starts itself run with ray_defaults: a real private head (as a SLURM cell's) has
them in every process, a value the node's environment sets wins, and Ray acts on them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from ocr_cluster import ray_defaults
from ocr_cluster.sweep.ray_head import start_head


def _environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        items = [item.decode(errors="replace") for item in f.read().split(b"\0") if item]
    return dict(item.split("=", 1) for item in items if "=" in item)


def _descendants(root: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process under `root`."""
    children: dict[int, list[int]] = {}
    cmds: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmds[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        out.append((pid, cmds.get(pid, "")))
        todo += children.get(pid, [])
    return out


CLIENT = textwrap.dedent("""
    import json, time, ray
    from ray.util.state import list_tasks

    ray.init(logging_level="ERROR")

    @ray.remote
    def where():
        import os
        return {k: os.environ.get(k) for k in ("RAY_task_events_report_interval_ms", "RAY_enable_metrics_collection")}

    seen = ray.get(where.remote())
    time.sleep(3)  # task events, where on, reach the GCS within a second
    print(json.dumps({"worker_env": seen, "tasks": len(list_tasks(filters=[("name", "=", "where")]))}))
""")


def test_private_head_runs_with_the_defaults_and_the_node_env_wins(tmp_path):
    base = {**os.environ, "REPORTER_UPDATE_INTERVAL_MS": "12345"}  # the node's own choice
    head = start_head(num_cpus=1, object_store_mb=80, base_env=base, timeout=180)
    try:
        procs = _descendants(head.pid)
        raylet = next(pid for pid, cmd in procs if "raylet" in cmd.split(" ", 1)[0])
        agent = next(pid for pid, cmd in procs if "dashboard/agent.py" in cmd)
        log_monitor = next(pid for pid, cmd in procs if "log_monitor.py" in cmd)
        want = {**ray_defaults.NODE_ENV, **ray_defaults.JOB_ENV, "REPORTER_UPDATE_INTERVAL_MS": "12345"}
        for pid in (raylet, agent, log_monitor):
            env = _environ(pid)
            assert {key: env.get(key) for key in want} == want
        # As the cell's driver is started (sweep.task): the defaults under the node's environment.
        env = {**ray_defaults.under(dict(os.environ), ray_defaults.OWN_CLUSTER_ENV),
               **head.env, "RAY_ADDRESS": head.address}
        out = subprocess.run([sys.executable, "-c", CLIENT], env=env, capture_output=True, text=True,
                             timeout=180, cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        got = json.loads(out.stdout.strip().splitlines()[-1])
        assert got["worker_env"] == {"RAY_task_events_report_interval_ms": "0", "RAY_enable_metrics_collection": "0"}
        assert got["tasks"] == 0  # Ray acted on it: no task events were recorded
    finally:
        head.stop()


def test_set_node_env_keeps_what_the_environment_has(monkeypatch):
    for key in ray_defaults.NODE_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RAY_enable_metrics_collection", "1")
    ray_defaults.set_node_env()
    assert os.environ["RAY_enable_metrics_collection"] == "1"
    assert os.environ["RAY_task_events_report_interval_ms"] == "0"
    assert os.environ["REPORTER_UPDATE_INTERVAL_MS"] == ray_defaults.NODE_ENV["REPORTER_UPDATE_INTERVAL_MS"]
