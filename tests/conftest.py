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
# Every executable goes to that cache (minimum compile time 0): a launcher subprocess then loads what the
# session or an earlier launcher compiled, the ~100 small initialiser programs of a model included.
# Measured (2 CPU cores): tests/test_train_e2e.py 123 -> 97 CPU s, the fast tier unchanged (201 -> 205 s).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# XLA's LLVM backend at optimisation level 0 for this process and the subprocesses it starts (read when the
# backend starts, after this file). The suite is dominated by compiling tiny programs that run a few times:
# measured on 2 CPU cores, the fast tier takes 18 % less CPU (225 -> 184 s) and compile-bound tests 30-40 %
# less; every test's assertions and tolerances are unchanged (the 1-vs-8-device script's losses are the same
# to the bit at levels 0 and 2). XLA's own HLO passes still run (FLOP counts are identical). To test at the
# default level, set XLA_FLAGS=--xla_backend_optimization_level=2 (a level given in XLA_FLAGS is kept).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
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
  config.addinivalue_line("markers", "slow: takes more than ~15 s on 2 CPU cores; the fast tier is "
                          "`python -m pytest -q -m \"not slow\" tests`")
