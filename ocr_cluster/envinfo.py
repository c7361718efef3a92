"""Environment report: versions, devices, and (with --ray) the Ray cluster it can reach.

`python -m ocr_cluster.envinfo [--ray]` prints one JSON object. It is what `make quickstart` checks
and what the service smoke tests run through `ray job submit` and SLURM.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys


def report() -> dict:
    """Versions and devices of this process's environment."""
    import pyarrow
    import ray
    import torch

    import ocr_cluster

    return {
        "ocr_cluster": ocr_cluster.__version__,
        "python": platform.python_version(),
        "executable": sys.executable,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": torch.cuda.device_count(),
        "ray": ray.__version__,
        "pyarrow": pyarrow.__version__,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }


def ray_report(address: str | None) -> dict:
    """Connect to Ray (RAY_ADDRESS, `address`, or a new local cluster) and run one task on it."""
    import ray

    started_local = not (address or os.environ.get("RAY_ADDRESS"))
    kwargs = {"object_store_memory": 256 * 1024**2} if started_local else {}
    ray.init(address=address or None, logging_level="ERROR", **kwargs)
    try:
        remote_report = ray.get(ray.remote(num_cpus=0.1)(report).remote())
        return {
            "local_cluster": started_local,
            "resources": {k: v for k, v in ray.cluster_resources().items() if not k.startswith("node:")},
            "nodes": len(ray.nodes()),
            "task": remote_report,
        }
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ocr_cluster.envinfo", description=__doc__)
    parser.add_argument("--ray", action="store_true", help="also connect to Ray and run a task there")
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local cluster)")
    args = parser.parse_args(argv)
    out = report()
    if args.ray:
        out["ray_cluster"] = ray_report(args.address)
    print(json.dumps(out, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
