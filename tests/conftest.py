"""Shared fixtures: never touch the network or the user's home, keep images tiny.

The repository root is importable through pytest.ini's ``pythonpath``.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ["OSAD_OFFLINE"] = "1"  # tests never download weights
# Tests use tiny tensors: one passive OpenMP thread is as fast on an idle machine and many
# times faster when other processes share the two cores (spinning threads fight them).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def wait_until(pred, timeout: float, poll: float = 0.05):
    """``pred()``'s first truthy value within ``timeout`` seconds, else an AssertionError."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        value = pred()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"condition not met within {timeout} s")


def cross_device_tol(device, rtol: float = 1e-5, atol: float = 1e-5, cuda_atol: float = 2e-2) -> dict:
    """assert_allclose tolerances for a model's outputs on ``device`` against its CPU outputs.

    Exact float32 on the CPU. On CUDA, PyTorch runs convolutions in TF32 (10-bit mantissa),
    so relative differences around 1e-3 are expected (the suite also runs on GPU machines).
    """
    import torch  # not at the top: torch must load after the OpenMP settings above

    return dict(rtol=rtol, atol=atol) if torch.device(device).type == "cpu" else dict(rtol=2e-2, atol=cuda_atol)


HEADCT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "headct"


POSTGRES_URL_ENV = "OSAD_TEST_POSTGRES_URL"


@pytest.fixture(scope="session")
def postgres_server():
    """Throw-away databases on the server of ``OSAD_TEST_POSTGRES_URL``; the
    PostgreSQL variants of the tests skip, saying why, when it is unset."""
    url = os.environ.get(POSTGRES_URL_ENV)
    if not url:
        pytest.skip(f"no PostgreSQL server: set {POSTGRES_URL_ENV} (scripts/pg_tmp.sh starts a throw-away one)")
    from db.scratch import ScratchDatabases

    server = ScratchDatabases(url, prefix="osad_test")
    yield server
    server.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, monkeypatch) -> str:
    """The test's database URL, once per backend, also set as ``OSAD_DATABASE_URL`` so
    code that calls ``init_db()``/``session_scope()`` without a URL uses it.

    SQLite: ``<data dir>/osad.db``. PostgreSQL: a fresh empty database on the server
    of ``OSAD_TEST_POSTGRES_URL`` (skipped when that is unset), dropped afterwards.
    The schema is not created: tests call ``init_db`` as the app does.
    """
    import db

    if request.param == "sqlite":
        url = f"sqlite:///{db.data_dir() / 'osad.db'}"
        monkeypatch.setenv("OSAD_DATABASE_URL", url)
        yield url
        return
    server = request.getfixturevalue("postgres_server")
    url = server.create()
    monkeypatch.setenv("OSAD_DATABASE_URL", url)
    try:
        yield url
    finally:
        db.dispose_engines()  # the pool's connections would keep the database in use
        server.drop(url)


@pytest.fixture(autouse=True)
def _isolated_data_dir(tmp_path, monkeypatch):
    """Every test gets its own data dir and SQLite database."""
    monkeypatch.setenv("OSAD_DATA_DIR", str(tmp_path / "osad-data"))
    monkeypatch.setenv("OSAD_IMPORT_ROOTS", str(tmp_path))  # server folders: the test's own files only
    monkeypatch.delenv("OSAD_DATABASE_URL", raising=False)
    monkeypatch.delenv("OSAD_BACKBONE_WEIGHTS", raising=False)
    yield
    import db

    db.dispose_engines()  # engines are cached per URL; each test has its own file


def _texture(rng, size):
    base = rng.normal(120, 12, (size, size, 1)).clip(0, 255)
    return np.repeat(base, 3, axis=2).astype(np.uint8)


def make_mvtec(root: Path, n_train=12, n_test_good=6, defects=("scratch", "hole"), n_defect=6, size=48,
               seed=0) -> Path:
    """A small synthetic MVTec-layout folder: noisy grey normals, anomalies with a bright
    (scratch) or dark (hole) square, and ground-truth masks."""
    rng = np.random.default_rng(seed)
    for sub in ["train/good", "test/good"] + [f"test/{d}" for d in defects] + [f"ground_truth/{d}" for d in defects]:
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        Image.fromarray(_texture(rng, size)).save(root / "train/good" / f"{i:03d}.png")
    for i in range(n_test_good):
        Image.fromarray(_texture(rng, size)).save(root / "test/good" / f"{i:03d}.png")
    for d in defects:
        for i in range(n_defect):
            img = _texture(rng, size)
            m = np.zeros((size, size), np.uint8)
            y, x = rng.integers(4, size - 16, 2)
            img[y:y + 12, x:x + 12] = 250 if d == "scratch" else 10
            m[y:y + 12, x:x + 12] = 255
            Image.fromarray(img).save(root / f"test/{d}" / f"{i:03d}.png")
            Image.fromarray(m).save(root / f"ground_truth/{d}" / f"{i:03d}_mask.png")
    return root


@pytest.fixture
def mvtec_dir(tmp_path) -> Path:
    return make_mvtec(tmp_path / "parts")


@pytest.fixture
def headct_dir() -> Path:
    if not HEADCT.is_dir():
        pytest.skip("../shared/datasets/headct is not available")
    return HEADCT
