"""Grain input pipelines over random-access record sources: training batches and evaluation shares.

A source is anything with `len(source)` and `source[i]` -> record dict (data_pipelines/records.py:
files or a built TFDS ArrayRecord dataset); it must pickle, since worker processes each open it.

Training (`train_batches`): the global stream is a pure function of the seed. Epoch e visits the
records in a permutation drawn from (seed, e) (grain's index_shuffle: O(1) memory, any size), cut
into global batches of `global_batch_size`; the last `len(source) % global_batch_size` positions
of every epoch are dropped (a different set each epoch), so every batch has the same shape and
the jitted step compiles once. Process p of P takes rows [p*B/P, (p+1)*B/P) of each global batch,
as `batches.process_slice` does, so the global batches do not depend on the process count and the
processes' rows of an epoch are disjoint. Each row carries "record_index" (which record) and
"sample_index" (its global position in the stream, step * B + row: a unique, deterministic id to
fold per-sample random keys from; int32, wrapping after 2^31 samples).

Batches are assembled before grain's worker processes split the work (each worker builds whole
batches, round-robin), so the batches are identical whatever `worker_count` is. The iterator's
state is its position (the next batch index) plus what fixes the stream (seed, batch size, record
count): `set_state` rebuilds the pipeline at that batch, which is exactly the batch the
uninterrupted run would have produced next, with any worker count. The state is stored per process
in the orbax checkpoint (`mediclip_jax.checkpoints.Checkpointer.save(..., data_iterator=)`).

Evaluation (`eval_batches`): this process's padded contiguous share (`batches.process_eval_indices`),
in order, in fixed-size batches (the last padded by repeating its last row, "valid" False); every
process yields the same number of batches, so collective programs stay in lockstep.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Iterator

import grain
import numpy as np
from absl import flags

from data_pipelines import preprocess

STATE_VERSION = 1
_INT32 = 2**31


def _mix_seed(seed: int, epoch: int) -> int:
  """A 32-bit shuffle seed for (seed, epoch): well mixed, so seed s epoch e+1 is unrelated to seed s+1 epoch e."""
  s = int(seed) % 2**64  # any integer seed, negative ones included
  return int(np.random.SeedSequence([s & 0xFFFFFFFF, s >> 32, int(epoch)]).generate_state(1)[0])


def _mp_prefetch(ds: grain.IterDataset, options: grain.MultiprocessingOptions) -> grain.IterDataset:
  """`ds` read by `options.num_workers` worker processes (none: `ds`).

  grain 0.2.18 reads an absl flag when starting workers and fails if absl has not parsed the command
  line (tests, notebooks, launchers other than absl's): then the flags are marked parsed, at their
  defaults (an absl `app.run` later still parses its argv).
  """
  if options.num_workers == 0:
    return ds
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return ds.mp_prefetch(options)


def _plain(batch: dict) -> dict[str, np.ndarray]:
  """Plain numpy copies of a batch (workers hand over shared-memory arrays, unlinked when dropped: a
  copy frees them at once, whatever the caller keeps)."""
  return {k: np.array(v) for k, v in batch.items()}


def _shard(shard_options: grain.sharding.ShardOptions | None) -> tuple[int, int]:
  """(process_index, process_count): the given ShardOptions, else this JAX process's."""
  opts = shard_options if shard_options is not None else grain.sharding.ShardByJaxProcess()
  p, n = int(opts.shard_index), int(opts.shard_count)
  if n < 1 or not 0 <= p < n:
    raise ValueError(f"shard_index {p} must lie in [0, shard_count={n})")
  return p, n


class MemorySource:
  """A source over records held in memory (a list of record dicts): generated data, tests."""

  def __init__(self, records):
    self.records = list(records)

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, i: int) -> dict:
    return self.records[i]

  def __repr__(self) -> str:
    return f"MemorySource({len(self.records)} records)"


# ------------------------------------------------------------------------------------------------
# Per-record transforms (pickleable: they travel to the worker processes)

@dataclasses.dataclass(frozen=True)
class TrainImage:
  """Training input of a record: {"image": (size, size) float32 grey in [0, 1]} (preprocess.train_array)."""
  size: int = 224

  def __call__(self, record: dict) -> dict:
    return {"image": preprocess.train_array(record["image"], self.size)}


@dataclasses.dataclass(frozen=True)
class EvalImage:
  """Evaluation input of a record: image (preprocess.test_array), label, has_mask and, with `masks`, the mask
  at `size` as uint8 {0, 1} (preprocess.mask_array; all zero for a record without one)."""
  size: int = 224
  color: str = "grey"
  masks: bool = True

  def __call__(self, record: dict) -> dict:
    mask = record.get("mask")
    out = {"image": preprocess.test_array(record["image"], self.size, self.color),
           "has_mask": np.bool_(record.get("has_mask", mask is not None)),
           "label": np.int32(record["label"])}
    if self.masks:
      out["mask"] = (np.zeros((self.size, self.size), np.uint8) if mask is None
                     else preprocess.mask_array(mask, self.size).astype(np.uint8))
    return out


class _LoadTrain(grain.transforms.Map):
  """Stream position -> transformed record + its record and sample index (the shuffle lives here)."""

  def __init__(self, source, transform: Callable[[dict], dict], *, seed: int, global_batch_size: int,
               process_index: int, process_count: int):
    self.source, self.transform, self.seed = source, transform, int(seed)
    self.n = len(source)
    self.global_batch_size = global_batch_size
    self.per = global_batch_size // process_count
    self.offset = process_index * self.per
    self.steps_per_epoch = self.n // global_batch_size

  def record_of(self, k: int) -> tuple[int, int]:
    """(record index, sample index) of this process's k-th row."""
    step, row = divmod(int(k), self.per)
    epoch, batch = divmod(step, self.steps_per_epoch)
    position = batch * self.global_batch_size + self.offset + row  # within the epoch's permutation
    record = int(grain.experimental.index_shuffle(position, max_index=self.n - 1, seed=_mix_seed(self.seed, epoch),
                                                  rounds=4))
    return record, (step * self.global_batch_size + self.offset + row) % _INT32

  def map(self, element: int) -> dict:
    record, sample = self.record_of(element)
    out = dict(self.transform(self.source[record]))
    out["record_index"] = np.int32(record)
    out["sample_index"] = np.int32(sample)
    return out


class TrainBatches:
  """This process's rows of each global batch, as dicts of numpy arrays; its position is its state.

  `get_state()` -> bytes (JSON), `set_state(bytes | str | dict)` continues with exactly the batch the
  uninterrupted iterator would have produced next (any worker count). `start_prefetch()` starts
  the workers ahead of the first `next` (grain's orbax handler calls it after restoring). Close it
  (or use it as a context manager) to stop its worker processes.
  """

  def __init__(self, batches: grain.MapDataset, load: _LoadTrain, num_batches: int | None,
               num_epochs: int | None, worker_count: int, worker_buffer_size: int, read_threads: int,
               prefetch: int):
    self._batches, self._load = batches, load
    self.num_batches, self.num_epochs = num_batches, num_epochs
    self._mp = grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=worker_buffer_size)
    self._read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
    self._next = 0
    self._it = None

  @property
  def steps_per_epoch(self) -> int:
    """Global batches per epoch (len(source) // global_batch_size)."""
    return self._load.steps_per_epoch

  @property
  def position(self) -> int:
    """Index of the next batch `next()` returns (batches are numbered from 0 across epochs)."""
    return self._next

  def __repr__(self) -> str:
    ld = self._load
    return (f"TrainBatches(seed {ld.seed}, global batch {ld.global_batch_size} ({ld.per} per process), "
            f"{ld.steps_per_epoch} steps per epoch over {ld.n} records, at batch {self._next})")

  def _fingerprint(self) -> dict:
    """What fixes the stream's batches (not the epoch count: it only says where the stream ends)."""
    return {"seed": self._load.seed, "global_batch_size": self._load.global_batch_size, "num_records": self._load.n}

  def start_prefetch(self) -> None:
    if self._it is None:
      self._it = iter(_mp_prefetch(self._batches[self._next:].to_iter_dataset(self._read), self._mp))
      if hasattr(self._it, "start_prefetch"):
        self._it.start_prefetch()

  def __iter__(self) -> TrainBatches:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.num_batches is not None and self._next >= self.num_batches:
      raise StopIteration
    self.start_prefetch()
    batch = _plain(next(self._it))
    self._next += 1
    return batch

  def seek(self, position: int) -> None:
    """Continues at batch `position` (e.g. the train step of a checkpoint saved without the data state)."""
    if position < 0 or (self.num_batches is not None and position > self.num_batches):
      raise ValueError(f"batch position {position} outside [0, {self.num_batches}]")
    self.close()
    self._next = int(position)

  def get_state(self) -> bytes:
    return json.dumps({"version": STATE_VERSION, "next_batch": self._next, **self._fingerprint()}).encode()

  def set_state(self, state: bytes | str | dict) -> None:
    if isinstance(state, (bytes, bytearray)):
      state = state.decode()
    if isinstance(state, str):
      state = json.loads(state)
    if state.get("version") != STATE_VERSION:
      raise ValueError(f"data iterator state version {state.get('version')!r}, expected {STATE_VERSION}")
    mine = self._fingerprint()
    diffs = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in mine.items() if state.get(k) != v]
    if diffs:
      raise ValueError("the saved data iterator state is for another stream (" + "; ".join(diffs) + ")")
    self.seek(int(state["next_batch"]))

  def close(self) -> None:
    """Stops the worker processes (the position is kept: the next `next` restarts them there)."""
    it, self._it = self._it, None
    if it is not None and hasattr(it, "close"):
      it.close()

  def __enter__(self) -> TrainBatches:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except  (interpreter shutdown)
      pass


def train_batches(source, *, global_batch_size: int, seed: int, transform: Callable[[dict], dict],
                  worker_count: int = 0, worker_buffer_size: int = 2, read_threads: int = 2, prefetch: int = 2,
                  num_epochs: int | None = None,
                  shard_options: grain.sharding.ShardOptions | None = None) -> TrainBatches:
  """This process's rows of every global batch of a seed-pure shuffled stream over `source`.

  `transform(record) -> dict of fixed-shape arrays` runs per record (in the workers when
  `worker_count` > 0). `shard_options` defaults to this JAX process (ShardByJaxProcess); tests pass
  ShardOptions(p, P). `num_epochs` None repeats forever. Memory: each reading process (this one, or
  each worker) builds batches with `read_threads` threads and holds up to `prefetch` of them; each
  worker hands over up to `worker_buffer_size` more, so at most about
  (worker_count + 1) * prefetch + worker_count * worker_buffer_size batches exist at once.
  """
  p, n_proc = _shard(shard_options)
  if not isinstance(global_batch_size, int) or global_batch_size < 1:
    raise ValueError(f"global_batch_size must be a positive integer, got {global_batch_size!r}")
  if global_batch_size % n_proc:
    raise ValueError(f"global batch size {global_batch_size} is not divisible by the process count {n_proc}; "
                     f"choose a multiple of {n_proc}")
  n = len(source)
  if n < global_batch_size:
    raise ValueError(f"the source has {n} records, fewer than one global batch of {global_batch_size}")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be >= 1 or None (forever), got {num_epochs}")
  if worker_count < 0:
    raise ValueError(f"worker_count must be >= 0, got {worker_count}")
  load = _LoadTrain(source, transform, seed=seed, global_batch_size=global_batch_size, process_index=p,
                    process_count=n_proc)
  num_batches = None if num_epochs is None else num_epochs * load.steps_per_epoch
  rows = sys.maxsize if num_batches is None else num_batches * load.per
  batches = grain.MapDataset.range(rows).map(load).batch(load.per, drop_remainder=True)
  return TrainBatches(batches, load, num_batches, num_epochs, worker_count, worker_buffer_size, read_threads,
                      prefetch)


# ------------------------------------------------------------------------------------------------
# Evaluation

class _LoadEval(grain.transforms.Map):
  """Row of this process's padded share -> transformed record + "index" and "valid"."""

  def __init__(self, source, transform: Callable[[dict], dict], indices: np.ndarray, valid: np.ndarray):
    self.source, self.transform, self.indices, self.valid = source, transform, indices, valid

  def map(self, element: int) -> dict:
    index = int(self.indices[element])
    out = dict(self.transform(self.source[index]))
    out["index"] = np.int32(index)
    out["valid"] = np.bool_(self.valid[element])
    return out


class EvalBatches:
  """This process's evaluation batches, in order; `len()` is the same on every process.

  Each iteration builds a fresh grain iterator (workers included) and stops it at the end.
  """

  def __init__(self, batches: grain.MapDataset, num_examples: int, worker_count: int, worker_buffer_size: int,
               read_threads: int, prefetch: int):
    self._batches, self.num_examples = batches, num_examples
    self._mp = grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=worker_buffer_size)
    self._read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)

  def __len__(self) -> int:
    return len(self._batches)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    it = iter(_mp_prefetch(self._batches.to_iter_dataset(self._read), self._mp))
    try:
      for batch in it:
        yield _plain(batch)
    finally:
      if hasattr(it, "close"):
        it.close()


def eval_batches(source, *, batch_size_per_process: int, transform: Callable[[dict], dict], worker_count: int = 0,
                 process_index: int | None = None, process_count: int | None = None, worker_buffer_size: int = 2,
                 read_threads: int = 2, prefetch: int = 2) -> EvalBatches:
  """This process's padded contiguous share of `source` in batches of `batch_size_per_process`.

  Rows: the transform's arrays plus "index" (record index) and "valid" (False on padding: the
  share's padding from `process_eval_indices` and the last batch's, both repeating a real record).
  """
  from data_pipelines import batches as batches_lib  # pylint: disable=import-outside-toplevel  (jax: not in workers)
  if not isinstance(batch_size_per_process, int) or batch_size_per_process < 1:
    raise ValueError(f"batch_size_per_process must be a positive integer, got {batch_size_per_process!r}")
  n = len(source)
  if n < 1:
    raise ValueError("cannot evaluate an empty source")
  indices, valid = batches_lib.process_eval_indices(n, process_index, process_count)
  pad = -len(indices) % batch_size_per_process
  indices = np.concatenate([indices, np.full(pad, indices[-1], indices.dtype)])
  valid = np.concatenate([valid, np.zeros(pad, bool)])
  ds = grain.MapDataset.range(len(indices)).map(_LoadEval(source, transform, indices, valid))
  return EvalBatches(ds.batch(batch_size_per_process, drop_remainder=True), n, worker_count, worker_buffer_size,
                     read_threads, prefetch)


def source_labels(source) -> np.ndarray:
  """Every record's label, in record order, without decoding images when the source can say them:
  `source.scalars()["label"]` (records.py's sources), else `source.labels()`, else by reading every record."""
  if callable(getattr(source, "scalars", None)):
    out = np.asarray(source.scalars()["label"], np.int64)
  elif callable(getattr(source, "labels", None)):
    out = np.asarray(source.labels(), np.int64)
  else:
    out = np.asarray([int(source[i]["label"]) for i in range(len(source))], np.int64)
  if out.shape != (len(source),):
    raise ValueError(f"{source!r} gave labels of shape {out.shape}, expected ({len(source)},)")
  return out
