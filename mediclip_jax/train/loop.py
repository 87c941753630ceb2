"""The generic training loop: data, step, periodic logging / evaluation / checkpointing, SIGTERM, resume.

It knows no method: a method module (`mediclip_jax.methods`) builds a `Trainable` and the loop
drives it. Batches are pure functions of (seed, step), so a run resumed from any checkpoint
ends with the same state as an uninterrupted one.

Multi-host: every process builds the same mesh and state, feeds only its rows of each global
batch, loads and scores only its share of the test set; the shares' maps and scores are
gathered so every process computes the same metrics, and only process 0 writes files.
"""
from __future__ import annotations

import json
import os
import platform
import signal
import time
import types

import jax
import ml_collections
import numpy as np

from data_pipelines import run_data
from mediclip_jax import checkpoints, parallel
from mediclip_jax.evaluate import analysis, figures, scoring
from mediclip_jax.methods.base import reads_anomaly_dataset
from mediclip_jax.train import workdir as workdir_lib
from mediclip_jax.train import writers

UNTRAINED = "untrained (step 0)"  # row labels of the final table
LAST = "last epoch"
BEST = "best_epoch_on_test (reference protocol)"
# Printed on the console (results.json and metrics.jsonl hold every metric, thresholds included).
SHOWN = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro",
         # image-text methods (MIRAGE)
         "zeroshot_auroc", "zeroshot_accuracy", "i2t_recall@1", "t2i_recall@1", "noise_auroc")


def shown(metrics: dict) -> dict:
  return {k: metrics[k] for k in SHOWN if k in metrics}


def validate(config: ml_collections.ConfigDict, anomaly: bool = True) -> None:
  """Raises ValueError naming the field for loop settings that cannot work (before anything is built); with
  `anomaly` (a method that reads an anomaly dataset) also the dataset's and the anomaly evaluation's."""
  positive = {"train.batch_size": config.train.batch_size, "train.epochs": config.train.epochs,
              "train.log_every_steps": config.train.log_every_steps,
              "train.checkpoint_every_steps": config.train.checkpoint_every_steps,
              "train.max_to_keep": config.train.max_to_keep, "eval.every_epochs": config.eval.every_epochs,
              "eval.batch_size": config.eval.batch_size, "data.image_size": config.data.image_size}
  for name, value in positive.items():
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"config.{name} must be a positive integer, got {value!r}")
  if not anomaly:
    return
  if config.eval.smoothing_sigma < 0:
    raise ValueError(f"config.eval.smoothing_sigma must be >= 0 (0 = raw maps), got {config.eval.smoothing_sigma}")
  if not 0.0 <= config.eval.threshold_quantile <= 1.0:
    raise ValueError(f"config.eval.threshold_quantile must lie in [0, 1], got {config.eval.threshold_quantile}")
  if not 0.0 < config.eval.aupro_max_fpr <= 1.0:
    raise ValueError(f"config.eval.aupro_max_fpr must lie in (0, 1], got {config.eval.aupro_max_fpr}")
  if config.data.source not in run_data.SOURCES:
    raise ValueError(f"config.data.source must be one of {run_data.SOURCES}, got {config.data.source!r}")
  if config.data.source == "tfds" and (config.data.phantom or not config.data.tfds_dir):
    raise ValueError("config.data.source='tfds' needs config.data.tfds_dir (launch/prepare_data.py prints it) and "
                     "no data.phantom (build phantoms as TFDS with launch/prepare_data.py --phantom N)")
  if not isinstance(config.data.workers, int) or config.data.workers < 0:
    raise ValueError(f"config.data.workers must be an integer >= 0 (0 = decode in the main process), "
                     f"got {config.data.workers!r}")
  analysis.validate(config.eval)
  if config.eval.streaming and not 8 <= config.eval.histogram_bits <= 24:
    raise ValueError(f"config.eval.histogram_bits must lie in [8, 24], got {config.eval.histogram_bits}")


class _Interrupt:
  """Turns SIGTERM into a clean stop after the current step (checkpoint, then exit)."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._old = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


class Interrupted(KeyboardInterrupt):
  """A SIGTERM stopped the run after writing a checkpoint at `step` (step 0: before any training,
  nothing to save; a rerun starts afresh)."""

  def __init__(self, step: int):
    super().__init__(f"SIGTERM: checkpoint written at step {step}; rerun to resume" if step else
                     "SIGTERM before the first training step: nothing trained, nothing saved")
    self.step = step


class _EvaluationAborted(Exception):
  """A SIGTERM arrived while scoring the test set: the evaluation is dropped between two batches."""


# What a checkpoint's state and support set depend on: resuming with any of them changed is refused.
# Where files live (weights, dataset root) and the compute dtype may change.
RESUME_FIELDS = ("method", "seed", "model", "vae", "data.phantom", "data.image_size", "data.k_shot",
                 "data.support_file", "data.color", "data.train_stream", "data.pairs", "mirage")
RESUME_FREE = ("model.clip.checkpoint", "model.bpe_path", "model.dtype", "vae.path")


def check_resumable(config: ml_collections.ConfigDict, step: int, meta: dict, workdir: str) -> None:
  """Refuses, listing every difference, to resume a checkpoint written with another architecture, data or
  support set (checked on the stored config, before anything is restored or written)."""
  stored = ml_collections.ConfigDict(meta["config"])

  def flat(c, prefix=""):
    out = {}
    for k, v in c.items():
      out.update(flat(v, f"{prefix}{k}.") if isinstance(v, ml_collections.ConfigDict) else {prefix + k: v})
    return out

  def norm(v):  # JSON round trip: tuples come back as lists
    return json.loads(json.dumps(v, default=str))

  new, old = flat(config), flat(stored)
  diffs = []
  for key in sorted(set(new) | set(old)):
    if any(key == f or key.startswith(f + ".") for f in RESUME_FIELDS) and key not in RESUME_FREE:
      a, b = norm(old.get(key, "<absent>")), norm(new.get(key, "<absent>"))
      if key not in old and not new.get(key):  # a field newer than the run, left off (False/None): as before
        continue
      if a != b:
        diffs.append(f"{key}: {a!r} -> {b!r}")
  if diffs:
    raise ValueError(f"{workdir}: cannot resume checkpoint step {step} with a different config ("
                     + "; ".join(diffs) + "). Use another --workdir, or the values it was trained with "
                     "(launch/train.py --print_config shows yours; <workdir>/config.json the run's)")


def _dump_params(state, path: str) -> None:
  """Writes this process's replica of the state's parameters (any pytree; dotted names such as
  "clip.visual.proj") to an .npz file."""
  def name(keys) -> str:
    parts = (getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in keys)
    return ".".join(str(p) for p in parts if p != "value")
  leaves = jax.tree_util.tree_leaves_with_path(state["params"])
  np.savez(path, **{name(p): np.asarray(v.addressable_data(0)) for p, v in leaves})


def _write_json(path: str, obj) -> None:
  """Strict JSON (non-finite numbers as null), written atomically."""
  def clean(x):
    if isinstance(x, dict):
      return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [clean(v) for v in x]
    if isinstance(x, (float, np.floating)):
      return float(x) if np.isfinite(x) else None
    if isinstance(x, np.integer):
      return int(x)
    return x
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(clean(obj), f, indent=2, allow_nan=False)
  os.replace(tmp, path)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, method: types.ModuleType,
                       dump_params: bool = False) -> dict:
  """Trains `method`, evaluates and checkpoints; resumes from `workdir` if it holds a checkpoint.

  Returns {"untrained", "last_epoch", "best_epoch_on_test (reference protocol)", "steps", "wall_s"}.
  With `dump_params`, each process also writes its copy of the final parameters to
  `workdir/params_process<i>.npz` (to check that processes stayed identical).
  """
  # SIGTERM is caught from the start (data loading, compilation, the untrained evaluation included): a
  # signal before the first step stops the run after it. Without this, a signal that arrives before the
  # loop either kills the process or, in a multi-process run, is swallowed by JAX's preemption notifier.
  with _Interrupt() as interrupt:
    return _train_and_evaluate(config, workdir, method, dump_params, interrupt)


def _train_and_evaluate(config, workdir, method, dump_params, interrupt) -> dict:
  validate(config, anomaly=reads_anomaly_dataset(method))
  method.validate(config)
  mesh = parallel.make_mesh()
  parallel.check_global_batch(config.train.batch_size, mesh)
  main = parallel.is_main_process()
  if not main:
    return _run(config, workdir, method, dump_params, interrupt, mesh, main)
  created = workdir_lib.FailedStartCleanup(workdir)
  try:
    with workdir_lib.Lock(workdir):
      return _run(config, workdir, method, dump_params, interrupt, mesh, main)
  except workdir_lib.WorkdirBusy:
    raise  # the holder's files, not ours
  except BaseException:
    created.remove_unless_checkpointed()
    raise


def _run(config, workdir, method, dump_params, interrupt, mesh, main) -> dict:
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.train.max_to_keep)
  resuming = checkpoints.has_checkpoint(ckpt.directory)
  if resuming:  # before the method builds (and writes its support set) or anything else is written
    check_resumable(config, *ckpt.newest_metadata(), workdir)
  dataset = test = None
  if reads_anomaly_dataset(method):
    dataset = run_data.open_dataset(config.data, workdir, config.seed)
    test = run_data.test_set(dataset, config.data, streaming=config.eval.streaming)
  trainable = method.build(config, dataset, workdir, mesh, train=True)
  spe = trainable.steps_per_epoch
  total = config.train.epochs * spe
  select_key = trainable.select_key or ("mean_image_pixel_auroc" if test.has_masks else "image_auroc")

  state = trainable.state
  start, restored = 0, None
  if resuming:
    restored = ckpt.restore_intact(state, mesh, fallback=config.train.checkpoint_fallback, set_aside=main)
    start = restored[0]
    if trainable.data_iterator is not None:  # the stream continues with the batch after the checkpoint's
      ckpt.restore_data(start, trainable.data_iterator)
  untrained, best, meta = None, {"score": None}, {}
  progress = writers.Progress(total, start, enabled=main)
  say = progress.write if main else (lambda line: None)
  held = f"test={len(test)} ({-(-len(test) // jax.process_count())} per process, " \
         f"{'streamed' if test.streaming else 'held in memory'}); " if test is not None else ""
  say(f"method={config.method} platform={jax.default_backend()} ({jax.local_devices()[0].device_kind}), "
      f"{mesh.devices.size} devices, {jax.process_count()} processes; {held}{total} steps of {spe} per epoch")
  for line in trainable.info.get("notes", ()):
    say(line)
  if restored:
    _, state, meta, problems = restored
    for problem in problems:
      say(f"WARNING: {problem}")
    untrained, best = meta.get("untrained"), meta.get("best", best)
    say(f"resumed from step {start}")
    results_path = os.path.join(workdir, "results.json")
    if start >= total and not meta.get("eval_pending") and os.path.isfile(results_path):
      with open(results_path, encoding="utf-8") as f:
        results = json.load(f)
      if results.get("steps") == total:  # finished: a rerun writes nothing, not even an event file
        say(f"the run finished at step {start}; nothing to do (results from {results_path})")
        progress.close()
        ckpt.close()
        return results
  if main:  # only once the run is known to build (and resume): a rejected config leaves the old one
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  metrics_log = writers.JsonlWriter(os.path.join(workdir, "metrics.jsonl")) if main else None
  tb = writers.TensorBoardWriter(os.path.join(workdir, "tensorboard")) if main else None
  calibrated = {}  # step -> Normalization of the state at that step

  def calibrate(step: int, progress=None):
    if step not in calibrated:
      calibrated.clear()
      calibrated[step] = scoring.calibrate(trainable.scorer(state), trainable.calibration_images,
                                           config.eval.batch_size, mesh, trainable.threshold, progress)
    return calibrated[step]

  multi = jax.process_count() > 1

  def evaluate(step: int) -> dict:
    if trainable.evaluate is not None:  # a method that evaluates itself (no anomaly test set)
      return trainable.evaluate(state)
    with writers.count_bar(len(test) + len(trainable.calibration_images), f"eval step {step}",
                           enabled=main) as bar:
      def tick(n: int) -> None:
        bar.update(n)
        # One process alone may stop between batches (processes score in lockstep: several agree
        # only at log steps, after the evaluation).
        if interrupt.requested and not multi:
          raise _EvaluationAborted
      norm = calibrate(step, tick)
      reconstruct = trainable.reconstructor(state) if trainable.reconstructor else None
      res, scores, examples = scoring.evaluate(trainable.scorer(state), test, config.eval, mesh, norm.threshold,
                                               tick, calibration_images=trainable.calibration_images,
                                               reconstruct=reconstruct)
    if main and config.eval.figures:
      pictures = figures.write_evaluation(os.path.join(workdir, "figures", f"step_{step:06d}"), scores,
                                          test.labels, examples, test.example, norm)
      tb.images(step, {f"eval/{k}": v for k, v in pictures.items()})
    return res

  def report(step: int, res: dict) -> None:
    if main:
      metrics_log.write({"step": step, "epoch": step / spe, **{f"eval/{k}": v for k, v in res.items()}})
      tb.scalars(step, {f"eval/{k}": v for k, v in res.items()})
      progress.write(writers.eval_line(step, step // spe, shown(res)))

  def record(step: int, res: dict, best: dict) -> dict:
    """Reports an evaluation; returns the best one so far by the reference's selection key."""
    report(step, res)
    if best["score"] is None or res[select_key] > best["score"]:
      best = {"score": res[select_key], "epoch": step // spe, "metrics": res, "key": select_key}
    return best

  def save(step: int, eval_pending: bool = False, calibrated: bool = True) -> None:
    """Checkpoints the state. Without `calibrated` (a SIGTERM before the last step: scoring the calibration
    images can take longer than a step) the threshold and normalisation are left out (None); the resumed
    run calibrates at its next checkpoint, and evaluate.py calibrates such a checkpoint itself."""
    norm = calibrate(step) if calibrated and trainable.scorer is not None else None
    meta = {"config": json.loads(config.to_json_best_effort()), "step": int(step),
            "threshold": norm and norm.threshold, "normalization": norm and norm.to_dict(),
            "eval_pending": eval_pending,
            "method": config.method, **trainable.info, "untrained": untrained, "best": best,
            "versions": {"jax": jax.__version__, "python": platform.python_version()}}
    ckpt.save(step, state, json.loads(json.dumps(meta, default=float)), force=True,
              data_iterator=trainable.data_iterator)

  eval_every = config.eval.every_epochs * spe
  final = {}
  t_start = time.perf_counter()

  def stopped(step: int) -> Interrupted:
    ckpt.close()
    progress.close()
    return Interrupted(step)

  if not start:  # the baseline every results table carries: same config, zero steps
    try:
      untrained = evaluate(0)
    except _EvaluationAborted:
      raise stopped(0) from None
    report(0, untrained)
  elif meta.get("eval_pending"):  # stopped by SIGTERM at an evaluation step before evaluating
    try:
      final = res = evaluate(start)
    except _EvaluationAborted:  # still pending in the checkpoint
      raise stopped(start) from None
    best = record(start, res, best)
  last_saved = start or None

  def check_finite(step: int, m) -> None:
    """Stops the run at a step whose update the method refused as non-finite (`methods.base.keep_finite`):
    the state is still that of the step before, and no checkpoint is written."""
    if not bool(m["finite"]):
      ckpt.close()
      progress.close()
      raise FloatingPointError(
          f"non-finite loss or parameters at step {step} (loss {float(m['loss'])}): stopped there, nothing of it "
          f"saved; the last checkpoint is {f'step {last_saved}' if last_saved else 'none'}. Lower train.lr or "
          "check the data")

  progress.compiling()
  step = start
  pending = False
  previous = None  # (step, metrics) of the step before: its flag is read once the next step is queued
  while step < total:
    batch = {k: parallel.global_array(v, mesh) for k, v in trainable.local_batch(step).items()}
    state, m = trainable.train_step(state, batch)
    if previous is not None:
      check_finite(*previous)
    step += 1
    previous = (step, m)
    logged = step % config.train.log_every_steps == 0 or step == total
    if logged:
      check_finite(step, m)  # waits for the step: a SIGTERM meanwhile is seen just below
      m = {k: float(v) for k, v in jax.device_get(m).items() if k != "finite"}
      if main:
        rec = {"step": step, "epoch": step / spe, **{f"train/{k}": v for k, v in m.items()},
               "elapsed_s": time.perf_counter() - t_start}
        metrics_log.write(rec)
        tb.scalars(step, {k: v for k, v in rec.items() if k.startswith("train/")})
    # A SIGTERM may reach the processes at different steps: they agree at log steps (a host sync
    # there anyway), so all of them stop and checkpoint at the same step.
    stop = (logged and parallel.any_process(interrupt.requested)) if multi else interrupt.requested
    progress.update(step, f"loss {m['loss']:.4f}" if logged else "")
    if (step % eval_every == 0 or step == total) and not stop:
      check_finite(*previous)
      try:
        res = evaluate(step)
      except _EvaluationAborted:  # checkpoint now; the resumed run evaluates this step first
        stop = pending = True
      else:
        best = record(step, res, best)
        final = res
    elif stop and (step % eval_every == 0 or step == total):
      pending = True
    if step % config.train.checkpoint_every_steps == 0 or step == total or stop:
      check_finite(*previous)
      save(step, pending, calibrated=not (stop and step < total))
      last_saved = step
    if stop and (step < total or pending):
      raise stopped(step)
  ckpt.close()
  progress.close()
  if not final:  # resumed at the last step: evaluate what was restored
    final = evaluate(step)
  if dump_params:
    _dump_params(state, os.path.join(workdir, f"params_process{jax.process_index()}.npz"))
  results = {"untrained": untrained, "last_epoch": final, BEST: best, "steps": total,
             "wall_s": time.perf_counter() - t_start, "backbone": trainable.info.get("backbone")}
  if trainable.finish is not None and main:
    results["outputs"] = trainable.finish(state, workdir)
  if trainable.scorer is not None:
    norm = calibrate(step)
    results["decision"] = {"threshold": norm.threshold, "normalization": norm.to_dict(), "rule": (
                 f"score > threshold, the threshold being quantile {config.eval.threshold_quantile} of the scores of "
                 f"the {len(trainable.calibration_images)} normal calibration (support) images, fixed before any "
                 "test image is seen; image_sensitivity/image_specificity measure it on the test set. The "
                 "*_f1_threshold metrics are different: the F1-maximising thresholds chosen on the test set "
                 "itself, for reporting only. predict.py reports normalised scores, this threshold at 0.5.")}
  if main:
    _write_json(os.path.join(workdir, "results.json"), results)
    metrics_log.close()
    tb.close()
  return results


def summary_rows(results: dict) -> dict[str, dict]:
  """The rows of a run's final table: untrained, last epoch, best epoch on test."""
  rows = {}
  if results.get("untrained"):
    rows[UNTRAINED] = shown(results["untrained"])
  rows[LAST] = shown(results["last_epoch"])
  best = results.get(BEST) or {}
  if best.get("metrics"):
    where = "validation" if str(best.get("key", "")).startswith("val_") else "test"
    rows[f"best on {where} (epoch {best['epoch']})"] = shown(best["metrics"])
  return rows


def decision_line(results: dict) -> str:
  """The stored decision and how it fares on the test set (last epoch), for the console."""
  if not results.get("decision"):
    return "decision: not recorded by this run"
  last, d = results["last_epoch"], results["decision"]
  return (f"decision: raw score > {d['threshold']:.4f} (normalised > 0.5; set on the normal support images): "
          f"sensitivity {last.get('image_sensitivity', float('nan')):.3f}, "
          f"specificity {last.get('image_specificity', float('nan')):.3f} on the test set")
