"""Runtime env JSON for `ray job submit`: jobs/runtime_env.yaml plus the non-secret object-storage
settings of the submitting shell (endpoint, region, profile name).

    ray job submit --address http://HEAD:8265 \\
        --runtime-env-json "$(python -m ocr_cluster.runtime_env jobs/runtime_env.yaml)" \\
        -- python -m ocr_cluster.train jobs/cityscapes/ocrnet_hr18_4xb2-40k_cityscapes-512x1024.yaml

Credentials are not passed: the nodes use their own (the environment `ray start` ran in, an instance
role, or ~/.aws profiles on the nodes). --with-secrets passes them too, in plain text: Ray writes the
runtime env into the runtime env agent log of every node and returns it from the job API.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import yaml

# Settings, passed through when set in the submitting shell.
PASSED_THROUGH = ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE")
# Credentials, passed only with --with-secrets. FSSPEC_S3 is s3fs's JSON config, which may hold key and secret.
SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "FSSPEC_S3")


def build(path: str | None, with_secrets: bool = False) -> dict:
    env: dict = {}
    if path:
        with open(path) as handle:
            env = yaml.safe_load(handle) or {}
    env_vars = {str(k): str(v) for k, v in (env.get("env_vars") or {}).items()}
    names = PASSED_THROUGH + (SECRETS if with_secrets else ())
    env_vars.update({key: os.environ[key] for key in names if os.environ.get(key)})
    env["env_vars"] = env_vars
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ocr_cluster.runtime_env", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runtime_env", nargs="?", default=None, help="base runtime env YAML")
    parser.add_argument("--with-secrets", action="store_true",
                        help=f"also pass {', '.join(SECRETS)} (visible in Ray's logs and job API)")
    args = parser.parse_args(argv)
    present = [key for key in SECRETS if os.environ.get(key)]
    if args.with_secrets:
        print(f"warning: --with-secrets puts {', '.join(present) or 'the credential variables (none set now)'} "
              "in the runtime env in plain text: visible in logs/runtime_env_agent.log under every node's Ray "
              "temp dir and to anyone who can read the job API (ray job list)", file=sys.stderr)
    elif present:
        print(f"note: {', '.join(present)} not passed; the nodes use their own credentials "
              "(see README, Object storage), or pass --with-secrets", file=sys.stderr)
    print(json.dumps(build(args.runtime_env, with_secrets=args.with_secrets)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
