"""CPU time per process role under a command, from /proc: `python benchmarks/proc_cpu.py OUT.json -- CMD...`.

Runs CMD, samples /proc every 0.5 s, and attributes each process's CPU time (user + system) since the
last sample to its title at that moment: Ray names its worker processes after what they run
(`ray::SplitCoordinator`, `ray::RayTrainWorker...`, `ray::ReadShards->MapBatches(...)`), so the table
says which actor or task used the CPU. Linux only, no dependencies (psutil is not in the venv).
Written for issue 13 item 4 (the split coordinator's CPU in `make quickstart`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import defaultdict

TICK = os.sysconf("SC_CLK_TCK")


def snapshot() -> dict[int, tuple[int, float, str]]:
    """pid -> (ppid, cpu seconds, title) for every readable process."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        comm_end = stat.rfind(")")
        fields = stat[comm_end + 2:].split()
        ppid, cpu = int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK
        out[int(name)] = (ppid, cpu, cmd or stat[stat.find("(") + 1:comm_end])
    return out


def role(title: str) -> str:
    """A process title folded into a role: Ray task/actor names kept, paths and arguments dropped."""
    if title.startswith("ray::"):
        return re.sub(r"\s.*", "", title)
    words = title.split()
    exe = os.path.basename(words[0]) if words else "?"
    if exe.startswith("python"):
        mod = next((w for w in words[1:] if not w.startswith("-")), "")
        return f"python {os.path.basename(mod)}"[:60]
    return exe[:60]


def main() -> int:
    out_path, cmd = sys.argv[1], sys.argv[sys.argv.index("--") + 1:]
    start = time.time()
    child = subprocess.Popen(cmd)
    seen: dict[int, float] = {}
    by_role: dict[str, float] = defaultdict(float)
    per_pid: dict[int, dict] = {}
    while True:
        snap = snapshot()
        ours = {child.pid}
        changed = True
        while changed:  # descendants of the command (Ray's daemons and workers are)
            changed = False
            for pid, (ppid, _, _) in snap.items():
                if ppid in ours and pid not in ours:
                    ours.add(pid)
                    changed = True
        for pid in ours & snap.keys():
            _, cpu, title = snap[pid]
            delta = cpu - seen.get(pid, 0.0)
            seen[pid] = cpu
            by_role[role(title)] += delta
            entry = per_pid.setdefault(pid, {"first_title": title[:120], "cpu_s": 0.0})
            entry["cpu_s"], entry["last_title"] = cpu, title[:120]
        if child.poll() is not None:
            break
        time.sleep(0.5)
    wall = time.time() - start
    total = sum(by_role.values())
    with open(out_path, "w") as f:
        json.dump({"cmd": cmd, "wall_s": wall, "rc": child.returncode, "cpu_s_total": total,
                   "by_role": dict(sorted(by_role.items(), key=lambda kv: -kv[1])), "per_pid": per_pid}, f, indent=1)
    print(f"[proc_cpu] wall {wall:.1f} s, CPU {total:.1f} s; top roles:", file=sys.stderr)
    for name, cpu in sorted(by_role.items(), key=lambda kv: -kv[1])[:12]:
        print(f"[proc_cpu] {cpu:8.1f} s  {name}", file=sys.stderr)
    return child.returncode


if __name__ == "__main__":
    sys.exit(main())
