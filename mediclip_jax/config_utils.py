"""Helpers for ml_collections config files (`get_config(arg)`), in the big_vision style."""
from __future__ import annotations

import os
import sys

import ml_collections
from absl import flags


def parse_arg(arg: str | None, lazy: bool = False, **spec) -> ml_collections.ConfigDict:
  """Parses a config argument such as "variant=ViT-B-16,shot=4,phantom" into typed values.

  Every key must be declared in `spec` (its default fixes the type); a bare word `w` means
  `w=True` and must name a bool. Unknown keys raise unless `lazy`, which keeps them as strings.
  """
  res = ml_collections.ConfigDict(dict(spec))
  if not arg:
    return res
  for item in arg.split(","):
    if not item:
      continue
    key, sep, value = item.partition("=")
    key = key.strip()
    if key not in spec:
      if not lazy:
        raise ValueError(f"config argument {key!r} is not one of {sorted(spec)} (in {arg!r})")
      res[key] = value if sep else True
      continue
    default = spec[key]
    if not sep:
      if not isinstance(default, bool):
        raise ValueError(f"config argument {key!r} needs a value ({key}=...), got a bare word in {arg!r}")
      res[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {key}={value!r}: expected true/false")
      res[key] = value.lower() in ("true", "1")
    elif default is None:
      res[key] = value
    else:
      try:
        res[key] = type(default)(value)
      except ValueError as e:
        raise ValueError(f"config argument {key}={value!r}: expected {type(default).__name__}") from e
  return res


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing for launchers (`app.run(main, flags_parser=parse_flags)`), with every bad flag or
  config override, a misspelt `--config.x.y` included, reported as one line and exit code 2 instead of
  a traceback. A config file that fails to load keeps its traceback (the error is in the file)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    message = str(e)
  except (AttributeError, KeyError, TypeError) as e:  # ml_collections: unknown field, wrong type
    message = str(e.args[0] if e.args else e).strip("'\"").replace("\\n", " ").replace("\\'", "'")
  print(f"error: {os.path.basename(argv[0])}: {message}", file=sys.stderr)
  sys.exit(2)
