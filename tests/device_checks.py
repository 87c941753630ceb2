"""Helpers of the scripts that run on 8 fake devices and compare with 1 (tests/method_multidevice.py). Import
after XLA_FLAGS is set."""
from __future__ import annotations

import collections

import jax
import numpy as np


class CompileCounter(collections.Counter):
  """Executables XLA builds (or loads from the persistent cache), by jitted function name, from JAX's
  backend-compile event; `clear()` before the span to count."""

  def __init__(self):
    super().__init__()
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event: str, duration: float, **kw) -> None:
    del duration
    if event == "/jax/core/compile/backend_compile_duration":
      self[str(kw.get("fun_name"))] += 1


def host(tree):
  """A numpy copy (the steps donate their input state)."""
  return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def max_diff(a, b) -> float:
  """Largest absolute difference between two pytrees of the same structure."""
  return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(x - y).max()), a, b)))
