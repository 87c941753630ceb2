"""The methods the trainer serves, by `config.method` name (see `base.py` for the interface)."""
from __future__ import annotations

import types

from mediclip_jax.methods import mediclip

METHODS: dict[str, types.ModuleType] = {mediclip.NAME: mediclip}


def get(name: str) -> types.ModuleType:
  """The method module registered as `name`."""
  if name not in METHODS:
    raise ValueError(f"config.method must be one of {sorted(METHODS)}, got {name!r}")
  return METHODS[name]
