"""Shared test fixtures: where ../shared lives, and skipping what needs optional packages."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# One persistent XLA compilation cache per test session, inherited by the launcher subprocesses:
# the end-to-end tests start the same training program several times (run, SIGTERM, kill -9, resume).
_OWN_CACHE = None if "JAX_COMPILATION_CACHE_DIR" in os.environ else tempfile.mkdtemp(prefix="mediclip_jax_xla_")
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "2")
SHARED = Path(os.environ.get("MEDICLIP_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
  """The ../shared folder beside the checkout (datasets, TAEF2 weights, CLIP vocabulary)."""
  if not SHARED.is_dir():
    pytest.fail(f"expected the shared data folder at {SHARED} (set MEDICLIP_SHARED to override)")
  return SHARED


@pytest.fixture(scope="session")
def bpe_path(shared_dir) -> Path:
  return shared_dir / "weights" / "clip" / "bpe_simple_vocab_16e6.txt.gz"


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: takes more than ~20 s on 2 CPU cores; the fast tier is "
                          "`python -m pytest -q -m \"not slow\" tests`")
