"""What a method's benchmark hook (`methods.BENCH_PARTS`) returns to launch/benchmark.py, for any method."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol


class Feed(Protocol):
  """A fed mode's batch source: `feed(step, warm)` gives that step's global batch; `fields()` the
  mode's extra JSON fields (at least "input", a description); `close()` releases workers."""

  def __call__(self, step: int, warm: bool) -> dict: ...

  def fields(self) -> dict: ...

  def close(self) -> None: ...


class Stage(NamedTuple):
  """One part of the step timed alone: `build()` gives the jitted program, run as `program(*args(i))` at
  iteration i; `build` is None where the stage does not apply to the config."""
  name: str
  build: Callable[[], Callable] | None
  args: Callable[[int], tuple]
  model_flops: float | None
  note: str


@dataclasses.dataclass
class BenchParts:
  """What the benchmark hook returns.

  fed_step: (state, batch {"image", "mask"}) -> (state, metrics), `state` as `Trainable.state`
    and donated; the step without synthesis. None: the method has no fed modes (only the fused step).
  feeds: mode -> (number of batches it will be asked for) -> Feed, for the modes that can run.
  unavailable: mode -> why it cannot run here (missing packages, latent tasks on the host).
  stages: () -> the stages (their inputs placed on the mesh; each program built when timed); None: no
    per-stage breakdown.
  flops: analytic FLOPs per global step by component, with their sum in "total", of the
    "fused_step" and the "fed_step".
  info: JSON facts: "model", "synthesis", "dtype_policy", "step_program".
  """
  fed_step: Callable[[Any, dict], tuple[Any, dict]] | None
  feeds: dict[str, Callable[[int], Feed]]
  unavailable: dict[str, str]
  stages: Callable[[], list[Stage]] | None
  flops: dict[str, dict[str, float]]
  info: dict
