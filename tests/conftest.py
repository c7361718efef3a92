"""Shared fixtures: the real local services, started once per test session when a test first needs them.

- `ray_cluster`: a Ray head on 127.0.0.1 (own ports and temp dir, capped object store, token auth with
  a token of its own, exported to this process), reachable by `ray job submit` at
  `ray_cluster.dashboard_url` and by `ray.init(ray_cluster.address)`. It has no S3 credentials of its own:
  a job that needs them passes them in its runtime env.
- `s3`: moto's S3 server on 127.0.0.1 with a bucket; the AWS variables point at it for the test, and
  `s3.url("name")` gives a fresh s3:// prefix.
- `slurm`: a two-node SLURM cluster on this host (slurmctld + slurmd n1, n2 on 127.0.0.2, 127.0.0.3 + munge)
  with SLURM_CONF set for the test.
- `bare_ray_node` (once per session, stopped after the last test that uses it): a second Ray head whose
  Python has every dependency but not this package, as a fresh cluster node, with S3 credentials of its own
  (planted, distinctive) in its environment.

With CI=true a service that cannot start fails the tests that need it; elsewhere they skip with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import services  # noqa: E402

os.environ.update(services.RAY_ENV)
IN_CI = os.environ.get("CI", "").lower() == "true"


# The session's temp dir. What the tests and everything they start put in TMPDIR lands in one folder,
# removed when the session ends: multiprocessing's pymp-* dirs (the Ray head's dashboard makes one and
# is killed before it can remove it), TensorBoard staging, local Ray sessions, torch's compile cache.
# pytest's own tmp_path dirs stay in the system temp dir, where its retention policy (pyproject.toml:
# only failed tests' dirs are kept) manages them. Set at import, before any service or test starts.
SYSTEM_TMP = tempfile.gettempdir()
os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", SYSTEM_TMP)
SESSION_TMP = tempfile.mkdtemp(prefix="ocrt-", dir=SYSTEM_TMP)  # short: Ray's socket paths must stay < 108 bytes
os.environ["TMPDIR"] = tempfile.tempdir = SESSION_TMP


def pytest_unconfigure(config):
    shutil.rmtree(SESSION_TMP, ignore_errors=True)  # after the session fixtures stopped the services


def _start(name: str, starter):
    try:
        return starter()
    except services.ServiceUnavailable as exc:
        message = f"{name} could not be started: {exc}"
        if IN_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


@dataclass
class RayCluster:
    address: str
    dashboard_url: str
    env: dict[str, str]


@dataclass
class S3:
    endpoint_url: str
    bucket: str
    env: dict[str, str]

    def url(self, name: str = "t") -> str:
        return f"s3://{self.bucket}/{name}-{uuid.uuid4().hex[:8]}"


@dataclass
class Slurm:
    partition: str
    env: dict[str, str]


CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "FSSPEC_S3", "AWS_PROFILE")


def _start_without_credentials():
    """services.start_ray with whatever S3 credentials this process has kept from the head."""
    saved = {key: os.environ.pop(key) for key in CREDENTIAL_VARS if key in os.environ}
    try:
        return services.start_ray()
    finally:
        os.environ.update(saved)


@pytest.fixture(scope="session")
def ray_cluster():
    """The shared Ray head. Its auth token is exported to this process for `ray.init(address=...)`."""
    service = _start("the Ray head", _start_without_credentials)
    saved = {key: os.environ.get(key) for key in service.env}
    os.environ.update(service.env)
    _reload_ray_token()
    yield RayCluster(service.info["address"], service.info["dashboard_url"], service.env)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _reload_ray_token()
    service.stop()


def _reload_ray_token() -> None:
    """Ray caches its config (RAY_AUTH_MODE) and the auth token per process at their first use, as Ray's own
    token set-up refreshes them: an earlier in-process use of Ray would keep auth 'disabled' or another token
    than the one just exported (InvalidAuthToken, "Missing authentication token")."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@dataclass
class BareRayNode(RayCluster):
    python: str
    temp_dir: Path
    node_env: dict[str, str]  # the node's own S3 settings and credentials (the secret is planted)
    secret: str


def _python_without_this_package(root: Path) -> str:
    """A venv whose Python imports this venv's packages (a .pth line naming its site-packages) but not
    ocr_cluster: a path line in a .pth file runs no .pth file inside it, so the editable install's finder
    stays unloaded."""
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(root)], check=True,
                   capture_output=True, timeout=120)
    python = str(root / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], env=env,
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "project_venv.pth").write_text(sysconfig.get_path("purelib") + "\n")
    probe = "import ray, torch, s3fs\ntry:\n import ocr_cluster\nexcept ModuleNotFoundError:\n print('bare')"
    out = subprocess.run([python, "-c", probe], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    if out.stdout.strip() != "bare":
        pytest.fail(f"the bare-node Python is not bare (or lacks a dependency): {out.stdout}{out.stderr}")
    return python


# Session services that only a few tests use, stopped after the last of them (pytest_runtest_teardown) rather
# than at the session's end: on CI's 2 cores the bare-node head's idle Ray processes (GCS, raylet, dashboard
# and its agent, log monitor) took ~8 % of the machine for the hour of tests that ran after its last user.
# Fixture name -> its service; whoever pops it stops it, once (its PIDs could be reused afterwards).
_STOP_AFTER_LAST_USER: dict[str, services.Service] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield
    for name in [n for n in _STOP_AFTER_LAST_USER if n in item.fixturenames]:
        later = item.session.items[item.session.items.index(item) + 1:]
        if not any(name in other.fixturenames for other in later):
            _STOP_AFTER_LAST_USER.pop(name).stop()


@pytest.fixture(scope="session")
def bare_ray_node(_s3_service):
    """A Ray head as a fresh cluster node: no ocr_cluster installed, S3 credentials in its own environment."""
    root = Path(tempfile.mkdtemp(prefix="ocr_bare_", dir="/tmp"))
    secret = f"planted-secret-{uuid.uuid4().hex}"
    node_env = {**_s3_service.env, "AWS_ACCESS_KEY_ID": f"planted-key-{uuid.uuid4().hex[:12]}",
                "AWS_SECRET_ACCESS_KEY": secret}  # moto accepts any key
    try:
        python = _python_without_this_package(root / "venv")
        service = _start("the bare-node Ray head", lambda: services.start_ray(python=python, node_env=node_env))
        _STOP_AFTER_LAST_USER["bare_ray_node"] = service
        try:
            yield BareRayNode(service.info["address"], service.info["dashboard_url"], service.env, python,
                              Path(service.info["temp_dir"]), node_env, secret)
        finally:
            if _STOP_AFTER_LAST_USER.pop("bare_ray_node", None) is not None:  # not stopped after its last user
                service.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def _s3_service():
    service = _start("the S3 endpoint (moto)", services.start_s3)
    yield service
    service.stop()


@pytest.fixture
def s3(_s3_service, monkeypatch) -> S3:
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "FSSPEC_S3"):
        monkeypatch.delenv(key, raising=False)
    for key, value in _s3_service.env.items():
        monkeypatch.setenv(key, value)
    return S3(_s3_service.info["endpoint_url"], _s3_service.info["bucket"], dict(_s3_service.env))


@pytest.fixture(scope="session")
def _slurm_service():
    service = _start("the SLURM cluster", services.start_slurm)
    yield service
    service.stop()


@pytest.fixture
def slurm(_slurm_service, monkeypatch) -> Slurm:
    for key, value in _slurm_service.env.items():
        monkeypatch.setenv(key, value)
    return Slurm(_slurm_service.info["partition"], dict(_slurm_service.env))


@pytest.fixture
def cli():
    """Run `ocr-cluster ARGS...` (or another entry via `module=`) in a subprocess of the test venv."""

    def run(*args: str, module: str | None = None, env: dict[str, str] | None = None, timeout: float = 120,
            cwd: Path | str | None = None) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", module] if module else [str(Path(sys.executable).parent / "ocr-cluster")]
        return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})}, cwd=cwd or REPO)

    return run
