"""Run outputs: strict JSON lines, TensorBoard events, a progress bar, text summaries, log levels.

Only process 0 writes (callers check `parallel.is_main_process()`). TensorBoard files come from
`tensorboardX` (no TensorFlow needed), imported on the first write: it imports torch when that is
installed, which costs seconds a run that never writes an event should not pay.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping

import numpy as np
from absl import logging as absl_logging
from tqdm import tqdm

from mediclip_jax.evaluate import figures

# Loggers of the libraries whose INFO lines drown a run's console. Orbax logs all of its ~40 INFO
# lines per checkpoint through absl's logger ("absl"); jax logs backend set-up under "jax._src.*".
THIRD_PARTY_LOGGERS = ("absl", "orbax", "jax", "jax._src", "jaxlib", "tensorstore", "tensorboardX")
LOGGER_NAME = "mediclip_jax"


def _plain(v):
  """Python value of `v` that strict JSON accepts: numpy/JAX scalars and arrays unwrapped, nan/inf -> None."""
  if isinstance(v, Mapping):
    return {str(k): _plain(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [_plain(x) for x in v]
  if isinstance(v, np.generic) or hasattr(v, "__array__"):
    v = np.asarray(v)
    v = v.item() if v.ndim == 0 else v.tolist()
    if isinstance(v, list):
      return _plain(v)
  if isinstance(v, float) and not math.isfinite(v):
    return None
  return v


class JsonlWriter:
  """One strict-JSON object per line, flushed; an existing file is appended to (a resumed run continues it)."""

  def __init__(self, path: str):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    self.path = path
    self._f = open(path, "a", encoding="utf-8")

  def write(self, record: Mapping) -> None:
    self._f.write(json.dumps(_plain(record), allow_nan=False) + "\n")
    self._f.flush()

  def close(self) -> None:
    self._f.close()


class TensorBoardWriter:
  """Scalars and images in `<logdir>/events.out.tfevents.*`, via tensorboardX.

  The event file is created on the first write, so reopening a finished run (which then writes
  nothing) does not leave an empty event file behind.
  """

  def __init__(self, logdir: str):
    self.logdir = logdir
    self._writer = None

  def _get(self):
    if self._writer is None:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._writer = SummaryWriter(self.logdir)
    return self._writer

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    """Numeric entries of `values` (non-numeric ones skipped; nan kept, TensorBoard shows it)."""
    numbers = {k: float(v) for k, v in values.items()
               if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)}
    if numbers:
      w = self._get()
      for tag, v in numbers.items():
        w.add_scalar(tag, v, int(step))
      w.flush()

  def images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """HWC RGB images, uint8 or float in [0, 1] (grayscale HW/HW1 is repeated to RGB)."""
    if images:
      w = self._get()
      for tag, img in images.items():
        w.add_image(tag, figures.rgb_uint8(img, keep_alpha=True), int(step), dataformats="HWC")
      w.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None


class Progress:
  """Training progress bar (tqdm) whose rate and ETA leave out compilation.

  The first update after the start (or a resume) contains the XLA compilation, so the rate is
  measured from that update on; tqdm's own rate would include it and understate the speed for a
  long while. With `enabled=False` no bar is drawn, but `write` and the compile line still print.
  Into a log file or pipe (not a terminal) the bar becomes a plain line at most every `log_every_s`
  seconds and at the last step, so logs hold no carriage returns or cursor moves.
  """

  def __init__(self, total_steps: int, start_step: int = 0, stream=sys.stderr, enabled: bool = True,
               log_every_s: float = 30.0, unit: str = "step"):
    self.total, self.start = int(total_steps), int(start_step)
    self.unit = unit  # what is counted: "step" (training), "img" (scoring an archive)
    self.stream = stream
    self.enabled = enabled
    self.tty = hasattr(stream, "isatty") and stream.isatty()
    self._log_every_s = log_every_s
    self._last_line = time.perf_counter()
    self._step = self.start
    self._compile_t0: float | None = None
    self._first: tuple[int, float] | None = None  # (step, time) of the first update: the rate's origin
    self.rate: float | None = None  # steady-state steps/s, once two updates have been seen
    self._bar = tqdm(total=self.total, initial=self.start, file=stream, disable=not (enabled and self.tty),
                     mininterval=0.1, unit=unit, dynamic_ncols=True,
                     bar_format="{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")

  def compiling(self) -> None:
    """Marks the start of the first (compiling) step; the next `update` reports how long it took."""
    self._compile_t0 = time.perf_counter()
    self._bar.set_postfix_str("compiling…", refresh=True)
    if self.enabled and not self.tty:
      self.write("compiling the train step…")

  def update(self, step: int, text: str = "") -> None:
    """Moves the bar to `step` (called after a step; `text`, e.g. the loss, goes in the postfix)."""
    now = time.perf_counter()
    if self._first is None:
      self._first = (step, now)
    elif step > self._first[0] and now > self._first[1]:
      self.rate = (step - self._first[0]) / (now - self._first[1])
    if self.rate:
      eta = tqdm.format_interval(max(self.total - step, 0) / self.rate)
      speed = f"{self.rate:.2f} {self.unit}/s, ETA {eta}"
    else:
      speed = f"? {self.unit}/s"
    if self._compile_t0 is not None:
      self.write(f"compiled in {now - self._compile_t0:.1f} s")
      self._compile_t0 = None
    postfix = f"{speed}, {text}" if text else speed
    self._bar.set_postfix_str(postfix, refresh=False)
    self._bar.update(step - self._step)
    self._step = step
    if self.enabled and not self.tty and (now - self._last_line >= self._log_every_s or step == self.total):
      self._last_line = now
      self.write(f"{self.unit} {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%), {postfix}")

  def write(self, line: str) -> None:
    """Prints `line` above the bar without breaking it."""
    tqdm.write(line, file=self.stream)

  def close(self) -> None:
    self._bar.close()


def count_bar(total: int, desc: str, enabled: bool = True, stream=sys.stderr) -> tqdm:
  """A transient progress bar over `total` images (evaluation, prediction) on a terminal: gone once
  closed, so the console keeps only the result line. Not drawn into log files or pipes."""
  tty = hasattr(stream, "isatty") and stream.isatty()
  return tqdm(total=int(total), desc=desc, file=stream, disable=not (enabled and tty), leave=False, unit="img",
              mininterval=0.1, dynamic_ncols=True)


def _fmt(v) -> str:
  return f"{v:.3f}" if isinstance(v, (int, float, np.integer, np.floating)) else str(v)


def eval_line(step: int, epoch: int, metrics: Mapping[str, float]) -> str:
  """One console line for an evaluation, e.g. `eval step 40 (epoch 20): image_auroc 0.612 ...`."""
  return f"eval step {step} (epoch {epoch}): " + " ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())


def summary_table(rows: Mapping[str, Mapping[str, float]]) -> str:
  """Fixed-width table: one row per label, one column per metric (union, in first-seen order; '—' if missing)."""
  cols = list(dict.fromkeys(k for r in rows.values() for k in r))
  cells = [[label] + [_fmt(r[c]) if c in r else "—" for c in cols] for label, r in rows.items()]
  header = [""] + cols
  widths = [max(len(x[i]) for x in [header] + cells) for i in range(len(header))]

  def line(xs):
    return "  ".join([xs[0].ljust(widths[0])] + [x.rjust(w) for x, w in zip(xs[1:], widths[1:])]).rstrip()

  return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(c) for c in cells])


def configure_logging(verbosity: int = 0) -> None:
  """Sets log levels for a run: our logger ("mediclip_jax") and the root at INFO; third parties
  (absl, through which orbax logs ~40 INFO lines per checkpoint, jax, tensorstore) at WARNING,
  or at INFO with `verbosity >= 1`. Adds a stderr handler if nothing handles the root yet.
  """
  level = logging.INFO if verbosity >= 1 else logging.WARNING
  # absl's verbosity first: with absl's handler installed it also resets the root level, set below.
  absl_logging.set_verbosity(absl_logging.INFO if verbosity >= 1 else absl_logging.WARNING)
  root = logging.getLogger()
  if not root.handlers:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
  root.setLevel(logging.INFO)
  for name in THIRD_PARTY_LOGGERS:
    logging.getLogger(name).setLevel(level)
  logging.getLogger(LOGGER_NAME).setLevel(logging.INFO)
