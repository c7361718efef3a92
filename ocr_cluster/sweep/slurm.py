"""What the sweep commands ask SLURM, through its command-line tools (no accounting needed).

`squeue` and `scontrol show job` tell the state of live jobs (and, for MinJobAge after the end, of
finished ones); `sacct` is read only when it answers. A job id is SLURM's text: "1234" or "1234_5"
for task 5 of array 1234.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from ocr_cluster.sweep.grid import SweepError

TIMEOUT_S = 30
# squeue states of a job that will still run (or is running): the cell is "live".
LIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
               "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"}


class SlurmError(SweepError):
    """SLURM cannot be used (no sbatch, controller down, unknown partition); one line, exit 2."""


@dataclass
class JobState:
    job_id: str
    state: str            # squeue / scontrol state, e.g. PENDING, RUNNING, COMPLETED
    reason: str = ""      # pending reason (Priority, Resources, ...)
    restarts: int = 0     # requeues so far (scontrol's Restarts)

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES


def _run(cmd: list[str], check: bool = False) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, check=check)
    except FileNotFoundError:
        raise SlurmError(f"`{cmd[0]}` is not on PATH: the SLURM client tools are needed") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"`{' '.join(cmd)}` did not answer within {TIMEOUT_S}s: is slurmctld reachable?") from None


def check_cluster(partition: str = "") -> None:
    """sbatch on PATH, the controller answering, the partition known; SlurmError (one line) otherwise."""
    if not shutil.which("sbatch"):
        raise SlurmError("sbatch is not on PATH: run `sweep launch` on a SLURM login node (or install the "
                         "SLURM client tools); nothing was submitted")
    ping = _run(["scontrol", "ping"])
    if ping.returncode != 0 or " is UP" not in ping.stdout:
        said = (ping.stdout + ping.stderr).strip().splitlines()
        raise SlurmError(f"the SLURM controller does not answer (scontrol ping: {said[-1] if said else 'no output'}); "
                         f"nothing was submitted")
    if partition:
        found = _run(["scontrol", "show", "partition", partition])
        if found.returncode != 0:
            names = _run(["sinfo", "-h", "-o", "%R"]).stdout.split()
            raise SlurmError(f"backend.slurm.partition: unknown partition {partition!r}; partitions: "
                             f"{', '.join(sorted(set(names))) or 'none'}; nothing was submitted")


def available() -> bool:
    """Whether squeue can be asked at all (for status without a cluster)."""
    return shutil.which("squeue") is not None


def _base(job_id: str) -> str:
    return job_id.split("_", 1)[0]


SQUEUE_FORMAT = "ArrayJobID:|,ArrayTaskID:|,State:|,Reason:|,RestartCnt:|"


def squeue(job_ids: list[str]) -> dict[str, JobState]:
    """The queued / running jobs among `job_ids` (array tasks one by one); finished jobs are absent."""
    if not job_ids:
        return {}
    bases = sorted({_base(j) for j in job_ids})

    def ask(ids: str) -> subprocess.CompletedProcess:
        return _run(["squeue", "-h", "-r", "-O", SQUEUE_FORMAT, "-j", ids])

    out = ask(",".join(bases))
    text = out.stdout
    if out.returncode != 0:  # a job id SLURM no longer knows can fail the whole query: ask one by one
        text = "".join(ask(b).stdout for b in bases)
    states = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) >= 5:
            array, task, state, reason, restarts = parts[:5]
            job_id = f"{array}_{task}" if task.isdigit() else array
            states[job_id] = JobState(job_id, state, "" if reason == "None" else reason,
                                      int(restarts) if restarts.isdigit() else 0)
    return states


def show_job(job_id: str) -> JobState | None:
    """`scontrol show job` (also for MinJobAge after the end); None when SLURM has forgotten the job."""
    out = _run(["scontrol", "show", "job", "-o", job_id])
    if out.returncode != 0:
        return None
    for line in out.stdout.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        array, task = fields.get("ArrayJobId"), fields.get("ArrayTaskId")
        this = f"{array}_{task}" if array and task and task.isdigit() else fields.get("JobId", "")
        if this == job_id or fields.get("JobId") == job_id:
            restarts = int(fields.get("Restarts", "0") or 0)
            reason = fields.get("Reason", "")
            return JobState(job_id, fields.get("JobState", "UNKNOWN"), "" if reason == "None" else reason, restarts)
    return None


def sacct_state(job_id: str) -> str | None:
    """The job's final state from accounting, or None when sacct does not answer (no slurmdbd)."""
    if not shutil.which("sacct"):
        return None
    try:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    states = out.stdout.split()
    return states[0].split()[0] if out.returncode == 0 and states else None


def scancel(job_ids: list[str]) -> list[str]:
    """Cancel jobs (array tasks or whole arrays); returns the ids scancel accepted."""
    done = []
    for job_id in job_ids:
        if _run(["scancel", job_id]).returncode == 0:
            done.append(job_id)
    return done


def minutes(time: str) -> int:
    """An sbatch --time value (checked by backends.SLURM_TIME) in minutes, for submitit."""
    days, _, rest = time.rpartition("-") if "-" in time else ("0", "", time)
    parts = [int(p) for p in rest.split(":")]
    if "-" in time:  # D-HH, D-HH:MM, D-HH:MM:SS
        hours, mins, secs = (parts + [0, 0])[:3]
    elif len(parts) == 1:  # minutes
        hours, mins, secs = 0, parts[0], 0
    elif len(parts) == 2:  # MM:SS
        hours, mins, secs = 0, parts[0], parts[1]
    else:
        hours, mins, secs = parts
    return max(1, int(days) * 1440 + hours * 60 + mins + (1 if secs else 0))
