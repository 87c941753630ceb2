"""Importing the package and the training launcher initialises no JAX backend: `launch/train.py` imports
everything at the top and must still be able to call `jax.distributed.initialize()` first."""
from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

SCRIPT = """
import importlib, pkgutil, sys
sys.path.insert(0, '.')
import jax._src.xla_bridge as xb
import mediclip_jax, data_pipelines
importlib.import_module('launch.train')
for pkg in (mediclip_jax, data_pipelines):
  for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):
    importlib.import_module(m.name)
print('initialised', xb.backends_are_initialized())
"""


def test_imports_initialise_no_backend():
  out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().splitlines()[-1] == "initialised False"
