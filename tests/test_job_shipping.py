"""What a `ray job submit` ships and what it leaves out: the whole package goes in the working dir, and
no credential goes into the runtime env, Ray's logs, the job API, rows, checkpoints or TensorBoard files.

The cluster tests run the README's recipe against `bare_ray_node`, a Ray head whose Python lacks this
package (as a fresh cluster node) and which has S3 credentials of its own, with a planted secret.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml
from ray._private.thirdparty.pathspec import PathSpec

from ocr_cluster import storage

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SECRET_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "FSSPEC_S3")


def _uploaded(relative: str) -> bool:
    """Whether Ray would upload REPO/relative: neither the runtime env's excludes nor .gitignore match it
    (both are gitwildmatch patterns relative to the working dir, the repository root)."""
    excludes = yaml.safe_load((REPO / "jobs/runtime_env.yaml").read_text())["excludes"]
    specs = [PathSpec.from_lines("gitwildmatch", excludes),
             PathSpec.from_lines("gitwildmatch", (REPO / ".gitignore").read_text().splitlines())]
    parts = relative.split("/")
    # Ray prunes a directory whose path matches, so every ancestor must pass too.
    return not any(spec.match_file("/".join(parts[:i])) for spec in specs for i in range(1, len(parts) + 1))


def test_runtime_env_ships_the_whole_package_and_keeps_local_folders_home():
    package = [p.relative_to(REPO).as_posix() for p in (REPO / "ocr_cluster").rglob("*.py")
               if "__pycache__" not in p.parts]
    assert "ocr_cluster/data/__init__.py" in package and "ocr_cluster/results/__init__.py" in package
    assert [p for p in package if not _uploaded(p)] == []
    for local in ("data/cityscapes/leftImg8bit/a.png", "runs/r1/model.pt", "results/attempts/x.parquet",
                  ".venv/bin/python", ".git/HEAD", "ocr_cluster/__pycache__/cli.cpython-311.pyc", "w.pth"):
        assert not _uploaded(local), local


def _runtime_env(cli, *args: str, **env: str):
    base = {key: "" for key in SECRET_VARS}  # unset whatever the calling shell has
    return cli("jobs/runtime_env.yaml", *args, module="ocr_cluster.runtime_env", env={**base, **env})


def test_runtime_env_passes_settings_but_no_credentials_by_default(cli):
    shell = {"AWS_ACCESS_KEY_ID": "AKIAPLANTEDPLANTED01", "AWS_SECRET_ACCESS_KEY": "planted/secret+value",
             "AWS_SESSION_TOKEN": "planted-token", "FSSPEC_S3": '{"secret": "planted"}',
             "AWS_ENDPOINT_URL": "http://minio.internal:9000", "AWS_DEFAULT_REGION": "eu-west-1",
             "AWS_PROFILE": "training"}
    result = _runtime_env(cli, **shell)
    assert result.returncode == 0, result.stderr
    env_vars = json.loads(result.stdout)["env_vars"]
    assert "planted" not in result.stdout.lower()
    assert env_vars["AWS_ENDPOINT_URL"] == "http://minio.internal:9000"
    assert env_vars["AWS_DEFAULT_REGION"] == "eu-west-1" and env_vars["AWS_PROFILE"] == "training"
    assert env_vars["PYTHONUNBUFFERED"] == "1"  # the base YAML's own
    assert "not passed" in result.stderr and "--with-secrets" in result.stderr

    opted_in = _runtime_env(cli, "--with-secrets", **shell)
    assert opted_in.returncode == 0, opted_in.stderr
    env_vars = json.loads(opted_in.stdout)["env_vars"]
    assert {key: env_vars.get(key) for key in SECRET_VARS} == {key: shell[key] for key in SECRET_VARS}
    warning = [line for line in opted_in.stderr.splitlines() if line.strip()]
    assert len(warning) == 1 and warning[0].startswith("warning:")
    assert "runtime_env_agent.log" in warning[0] and "job API" in warning[0]


def test_runtime_env_without_credentials_in_the_shell_says_nothing(cli):
    result = _runtime_env(cli)
    assert result.returncode == 0 and result.stderr == ""
    assert not set(SECRET_VARS) & set(json.loads(result.stdout)["env_vars"])


def test_redact_masks_url_userinfo():
    text = "a: s3://AKIAX:abc/def+g@host/bucket\nb: 'http://user:pass@minio:9000/b'\nc: s3://bucket/path@v2/x\n"
    masked = "a: s3://***@host/bucket\nb: 'http://***@minio:9000/b'\nc: s3://bucket/path@v2/x\n"
    assert storage.redact(text) == masked


def test_print_config_masks_url_userinfo(cli, tmp_path):
    from ocr_cluster.data.synth import SynthSpec, write_synthetic

    write_synthetic(str(tmp_path), SynthSpec(classes=3, num_train=2, num_val=1, size_hw=(32, 32)))  # for the run id
    result = cli("train", "--set", f"data.uri={tmp_path}",
                 "--set", "storage.checkpoint_uri=s3://KEYID:s3cr3t/value@host/bucket",
                 "--set", "results.store_uri=http://user:hunter2@minio:9000/results", "--print-config")
    assert result.returncode == 0, result.stderr
    assert "s3cr3t" not in result.stdout and "hunter2" not in result.stdout and "KEYID" not in result.stdout
    assert "s3://***@host/bucket" in result.stdout and "http://***@minio:9000/results" in result.stdout


# ---------------------------------------------------------------------------------------------
# On a bare node


@pytest.fixture(scope="module")
def shipped_job(bare_ray_node, _s3_service, tmp_path_factory):
    """The README's recipe, once, against the bare node: a tiny training job on S3, submitted from this
    checkout by a shell that holds the same credentials as the node (so leaving them out is tested)."""
    from ocr_cluster.data.synth import SynthSpec, write_synthetic

    shell = {**os.environ, **bare_ray_node.env, **bare_ray_node.node_env}
    shell.pop("RAY_ADDRESS", None)
    saved = dict(os.environ)
    os.environ.update(bare_ray_node.node_env)  # for writing the dataset and reading results back here
    try:
        root = f"s3://{_s3_service.info['bucket']}/bare-node-{os.urandom(4).hex()}"
        write_synthetic(f"{root}/synth", SynthSpec(classes=4, num_train=8, num_val=2, size_hw=(64, 64)))
        job = tmp_path_factory.mktemp("bare") / "tiny.yaml"
        job.write_text(yaml.safe_dump({
            "model": {"backbone": "hrnetv2_w18_small", "head": "ocr"},
            "data": {"dataset": "synthetic", "uri": f"{root}/synth", "crop_size": "64x64", "scale": "64x64",
                     "batch_size": 2},
            "schedule": {"iters": 4, "checkpoint_interval": 2, "log_interval": 2},
            "evaluation": {"interval": 4, "fps_images": 2},
            "cluster": {"num_workers": 2, "max_failures": 0},
            "storage": {"checkpoint_uri": f"{root}/runs"},
            "results": {"store_uri": f"{root}/results"}}))
        runtime_env = subprocess.run([sys.executable, "-m", "ocr_cluster.runtime_env", "jobs/runtime_env.yaml"],
                                     env=shell, cwd=REPO, check=True, capture_output=True, text=True).stdout

        def submit(*entrypoint: str) -> subprocess.CompletedProcess:
            cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", bare_ray_node.dashboard_url,
                   "--runtime-env-json", runtime_env, "--", *entrypoint]
            return subprocess.run(cmd, env=shell, cwd=REPO, capture_output=True, text=True, timeout=600)

        where = submit("python", "-c", "import sys, ocr_cluster as p; print('PREFIX', sys.prefix, p.__file__)")
        trained = submit("python", "-m", "ocr_cluster.train", str(job))
        token = bare_ray_node.env["RAY_AUTH_TOKEN"]
        request = urllib.request.Request(f"{bare_ray_node.dashboard_url}/api/jobs/",
                                         headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            job_api = response.read().decode()
        objects = {path: storage.filesystem(root)[0].cat_file(path) for path in storage.list_files(root)}
        yield {"where": where, "trained": trained, "job_api": job_api, "objects": objects, "root": root}
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.timeout(900)
def test_a_node_without_the_package_runs_the_job_from_what_it_ships(bare_ray_node, shipped_job):
    where, trained = shipped_job["where"], shipped_job["trained"]
    assert where.returncode == 0, (where.stdout + where.stderr)[-3000:]
    prefix, package = where.stdout.split("PREFIX ")[1].split()[:2]
    assert Path(prefix) == Path(bare_ray_node.python).parent.parent  # the node's Python, not this venv's
    assert "/runtime_resources/working_dir_files/" in package  # ocr_cluster came with the job

    log = trained.stdout + trained.stderr
    assert trained.returncode == 0, log[-4000:]
    assert "ModuleNotFoundError" not in log and "completed: mIoU" in log
    shipped = list(bare_ray_node.temp_dir.glob("session_*/runtime_resources/working_dir_files/*/ocr_cluster"))
    assert shipped and all((p / "data/__init__.py").is_file() and (p / "results/__init__.py").is_file()
                           for p in shipped)
    assert any(path.endswith("model.pt") for path in shipped_job["objects"])  # it trained on S3


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.timeout(900)
def test_the_nodes_credentials_appear_in_no_log_row_checkpoint_or_api(bare_ray_node, shipped_job):
    trained = shipped_job["trained"]
    planted = [bare_ray_node.secret, bare_ray_node.node_env["AWS_ACCESS_KEY_ID"]]
    assert trained.returncode == 0, (trained.stdout + trained.stderr)[-4000:]
    endpoint = bare_ray_node.node_env["AWS_ENDPOINT_URL"].encode()
    files = [p for p in bare_ray_node.temp_dir.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.name == "runtime_env_agent.log" for p in files)
    # The runtime env's settings reach the agent's log and the job API, so a passed secret would too.
    assert any(endpoint in p.read_bytes() for p in files if p.name == "runtime_env_agent.log")
    assert endpoint.decode() in shipped_job["job_api"]

    leaked = [str(p) for p in files for value in planted if value.encode() in p.read_bytes()]
    leaked += [path for path, data in shipped_job["objects"].items()
               for value in planted if value.encode() in data]
    assert leaked == []
    kinds = {kind for path in shipped_job["objects"]
             for kind in ("model.pt", "tfevents", ".parquet") if kind in path}
    assert kinds == {"model.pt", "tfevents", ".parquet"}  # checkpoints, TensorBoard and rows were searched
    outputs = shipped_job["job_api"] + trained.stdout + trained.stderr + shipped_job["where"].stdout
    assert [value for value in planted if value in outputs + shipped_job["where"].stderr] == []
