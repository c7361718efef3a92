"""Runtime env JSON for `ray job submit`: jobs/runtime_env.yaml plus the object-storage variables of
the submitting shell, so credentials reach the job without being written into any file.

    ray job submit --address http://HEAD:8265 \\
        --runtime-env-json "$(python -m ocr_cluster.runtime_env jobs/runtime_env.yaml)" \\
        -- python -m ocr_cluster.train jobs/cityscapes/ocrnet_hr18_4xb2-40k_cityscapes-512x1024.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import yaml

# Passed through when set in the submitting shell.
PASSED_THROUGH = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
                  "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "FSSPEC_S3")


def build(path: str | None) -> dict:
    env: dict = {}
    if path:
        with open(path) as handle:
            env = yaml.safe_load(handle) or {}
    env_vars = {str(k): str(v) for k, v in (env.get("env_vars") or {}).items()}
    env_vars.update({key: os.environ[key] for key in PASSED_THROUGH if os.environ.get(key)})
    env["env_vars"] = env_vars
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ocr_cluster.runtime_env", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runtime_env", nargs="?", default=None, help="base runtime env YAML")
    args = parser.parse_args(argv)
    print(json.dumps(build(args.runtime_env)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
