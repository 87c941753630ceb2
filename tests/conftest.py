"""Shared test fixtures: where ../shared lives, and skipping what needs optional packages."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
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


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: takes more than ~20 s on 2 CPU cores; the fast tier is "
                          "`python -m pytest -q -m \"not slow\" tests`")
