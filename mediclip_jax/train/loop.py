"""The training loop behind `launch/train.py`: data, model, fused step, evaluation, checkpoints, resume.

The few-shot support set (k images) is decoded once and kept on every device; each step the
host sends only (support index, global sample index) pairs, and synthesis, CLIP, loss and
update run in one jitted program. The batch order is a pure function of (seed, epoch), and
synthesis keys of (seed, step, sample index), so a run resumed from any checkpoint ends with
the same parameters as an uninterrupted one.

Multi-host: every process builds the same mesh and state; it feeds only its rows of each
global batch, loads and scores only its share of the test set, and the shares' maps and
scores are gathered so all processes compute the same metrics (only process 0 writes them).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import signal
import time

import jax
import ml_collections
import numpy as np
from flax import nnx

from data_pipelines import batches as batches_lib, datasets, phantom, preprocess, support as support_lib
from mediclip_jax import parallel
from mediclip_jax.evaluate import runner
from mediclip_jax.models import vae as vae_lib
from mediclip_jax.models.clip import CLIP_MEAN, CLIP_STD
from mediclip_jax.models.mediclip import MediCLIP
from mediclip_jax.train import checkpoints, step as step_lib, synthesis_fn, writers
from mediclip_jax.weights.clip_convert import clip_from_config
from mediclip_jax.weights.tokenizer import tokenizer_for


@dataclasses.dataclass
class Data:
  """Host-side arrays of one run: grayscale float32 images in [0, 1].

  Test images and masks are this process's share (all N in a single process); labels and
  names cover the whole test set (they come from the listing, not from image files).
  """
  root: str
  support: np.ndarray          # (K, H, W) few-shot normal images
  support_names: list[str]
  test_images: np.ndarray      # (n, H, W) this process's share, padded to ceil(N / processes)
  test_labels: np.ndarray      # (N,) int32, 1 = abnormal
  test_masks: np.ndarray | None  # (n, H, W) {0,1} or None
  test_names: list[str]        # (N,)
  test_valid: np.ndarray       # (n,) bool: False on the padding rows of the share


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Applies the preset's quirk flags to the synthesis section (one source of truth: `quirks`)."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.synthesis.pixel.cutpaste.paste_mode = c.quirks.paste_mode
    c.synthesis.pixel.shapes.foreground_only = bool(c.quirks.foreground_only)
  return c


def prepare_data(config: ml_collections.ConfigDict, workdir: str) -> Data:
  """Reads (or, for the phantom, generates) the dataset and draws or reads the support set."""
  d = config.data
  root = d.root
  if d.phantom:
    root = os.path.join(workdir, "phantom_data")
    marker = os.path.join(root, "samples", "test.json")
    for turn in ("main", "others"):  # process 0 writes; others write their own copy only without a shared disk
      if (turn == "main") == parallel.is_main_process() and not os.path.isfile(marker):
        phantom.make_phantom_dataset(root, n_train=max(d.k_shot, 16), n_test_normal=d.phantom_n_test,
                                     n_test_abnormal=d.phantom_n_test, size=d.phantom_size, seed=config.seed)
      parallel.sync(f"phantom_data_{turn}")
  if not root:
    raise datasets.DatasetError("config.data.root is not set: point it at a dataset directory (MediCLIP layout "
                                "root/samples/{train,test}.json, or plain folders root/train/normal, "
                                "root/test/{normal,abnormal}) or use the phantom dataset (config arg ':phantom')")
  ds = datasets.load_dataset(root)
  existing = os.path.join(workdir, support_lib.SUPPORT_FILE)
  if d.support_file:
    chosen = support_lib.read_support(d.support_file, ds)
  elif os.path.isfile(existing):  # a resumed run keeps its support set
    chosen = support_lib.read_support(existing, ds)
  else:
    chosen = support_lib.draw_support(ds, d.k_shot, config.seed)
  parallel.sync("support_read")  # nobody reads the file while process 0 rewrites it
  if parallel.is_main_process():
    support_lib.write_support(existing, chosen, config.seed, ds.root)
  names = [s.name for s in chosen]
  by_name = {s.name: s for s in ds.train}
  size = d.image_size
  sup = np.stack([preprocess.load_train_image(by_name[n].path, size) for n in names])
  test = ds.test
  share, valid = batches_lib.process_eval_indices(len(test))  # padding repeats the last index
  loaded: dict[int, np.ndarray] = {}
  for i in share:
    if i not in loaded:
      loaded[int(i)] = preprocess.load_test_image(test[i].path, size)
  images = np.stack([loaded[int(i)] for i in share])
  labels = np.asarray([s.label for s in test], np.int32)
  has_masks = any(s.mask_path for s in test)
  want = {"auto": has_masks, "on": True, "off": False}.get(d.pixel_metrics)
  if want is None:
    raise ValueError(f"config.data.pixel_metrics must be auto, on or off, got {d.pixel_metrics!r}")
  if want and not has_masks:
    raise ValueError(f"config.data.pixel_metrics='on' but the test set of {root} has no masks")
  masks = None
  if want:
    masks = np.stack([preprocess.load_mask(test[i].mask_path, size) if test[i].mask_path
                      else np.zeros((size, size), np.float32) for i in share])
  return Data(root=root, support=sup.astype(np.float32), support_names=list(names),
              test_images=images.astype(np.float32), test_labels=labels, test_masks=masks,
              test_names=[s.name for s in test], test_valid=valid)


def build_detector(config: ml_collections.ConfigDict) -> MediCLIP:
  clip = clip_from_config(config.model.clip)
  tok = tokenizer_for(config.model.clip.checkpoint, config.model.bpe_path)
  return MediCLIP(clip, tok, tap_layers=tuple(config.model.clip.tap_layers), n_ctx=config.model.n_ctx,
                  ctx_init_std=config.model.ctx_init_std, causal_text_mask=config.quirks.causal_text_mask,
                  logit_scale=config.quirks.logit_scale, rngs=nnx.Rngs(config.seed))


def steps_per_epoch(k: int, batch_size: int) -> int:
  return math.ceil(k / batch_size)


def batch_indices(step: int, k: int, batch_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(support indices, global sample indices) of a step's global batch.

  Each epoch visits a permutation of the k support images drawn from (seed, epoch); a batch
  that runs past the end wraps to the start of the same permutation, so every batch has the
  same size (the reference's last, smaller batch would recompile the step).
  """
  spe = steps_per_epoch(k, batch_size)
  epoch, j = divmod(step, spe)
  perm = np.random.default_rng([seed, epoch]).permutation(k)
  pos = (j * batch_size + np.arange(batch_size)) % k
  return perm[pos].astype(np.int32), (step * batch_size + np.arange(batch_size)).astype(np.int32)


def local_batch(step: int, k: int, batch_size: int, seed: int) -> dict[str, np.ndarray]:
  """This process's rows of the global batch."""
  sup, idx = batch_indices(step, k, batch_size, seed)
  n, p = jax.process_count(), jax.process_index()
  per = batch_size // n
  return {"support_index": sup[p * per:(p + 1) * per], "sample_index": idx[p * per:(p + 1) * per]}


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


def _metadata(config, data: Data, threshold: float, step: int) -> dict:
  return {"config": json.loads(config.to_json_best_effort()), "step": int(step), "threshold": float(threshold),
          "preprocessing": {"image_size": int(config.data.image_size), "grayscale": True,
                            "clip_mean": list(CLIP_MEAN), "clip_std": list(CLIP_STD),
                            "resize": "PIL bilinear"},
          "support": data.support_names, "data_root": data.root,
          "versions": {"jax": jax.__version__, "python": platform.python_version()}}


def _dump_params(params, path: str) -> None:
  """Writes this process's replica of the parameters (flat names) to an .npz file."""
  flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(params)}
  np.savez(path, **{k: np.asarray(v[...].addressable_data(0)) for k, v in flat.items()})


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, dump_params: bool = False) -> dict:
  """Trains, evaluates and checkpoints; resumes from `workdir` if it holds a checkpoint. Returns final metrics.

  With `dump_params`, each process also writes its own copy of the final parameters to
  `workdir/params_process<i>.npz` (to check that processes stayed identical).
  """
  config = resolve_config(config)
  os.makedirs(workdir, exist_ok=True)
  mesh = parallel.make_mesh()
  parallel.check_global_batch(config.train.batch_size, mesh)
  main = parallel.is_main_process()
  if main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  data = prepare_data(config, workdir)
  k = data.support.shape[0]
  spe = steps_per_epoch(k, config.train.batch_size)
  total = config.train.epochs * spe
  parallel.log_main("platform=%s (%s), %d local devices per process", jax.default_backend(),
                    jax.local_devices()[0].device_kind, jax.local_device_count())
  parallel.log_main("devices=%d processes=%d support=%d test=%d (%d per process) steps=%d", mesh.devices.size,
                    jax.process_count(), k, len(data.test_labels), len(data.test_valid), total)
  # Metrics need every mask: gather the shares once (every process then holds all of them).
  eval_masks = None if data.test_masks is None else parallel.gather_rows(data.test_masks.astype(np.uint8),
                                                                         data.test_valid)

  model = build_detector(config)
  graphdef, params, frozen_model = step_lib.split_model(model)
  optimizer = step_lib.make_optimizer(config.train)
  vae = vae_lib.load_vae(config.vae) if synthesis_fn.uses_latent(config.synthesis) else None
  synth, make_aux = synthesis_fn.build_synthesis(config.synthesis, vae)
  train_step = step_lib.make_train_step(graphdef, optimizer, synth, mesh, ml_collections.ConfigDict(
      {"truncate_labels": config.quirks.truncate_labels, "focal_gamma": config.train.focal_gamma}))
  frozen = parallel.replicate({"model": frozen_model, "aux": make_aux(data.support), "support": data.support}, mesh)
  state = parallel.replicate(step_lib.init_state(params, optimizer, config.seed), mesh)

  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.train.max_to_keep)
  best = {"score": -1.0}
  start = ckpt.latest_step() or 0
  if start:
    state, meta = ckpt.restore(start, state, mesh)
    best = meta.get("best", best)
    parallel.log_main("resumed from step %d", start)

  metrics_log = writers.JsonlWriter(os.path.join(workdir, "metrics.jsonl")) if main else None
  tb = writers.TensorBoardWriter(os.path.join(workdir, "tensorboard")) if main else None
  progress = writers.Progress(total, start) if main else None
  predict_fns = runner.make_predict_fn(graphdef, mesh)
  select_key = "mean_image_pixel_auroc" if data.test_masks is not None else "image_auroc"

  def evaluate() -> dict:
    """Each process scores its share; the gathered maps/scores give the same metrics everywhere."""
    maps, scores = runner.predict_sharded(graphdef, state["params"], frozen["model"], data.test_images,
                                          config.eval.batch_size, mesh, predict_fns)
    maps, scores = parallel.gather_rows(maps, data.test_valid), parallel.gather_rows(scores, data.test_valid)
    res = runner.compute_metrics(maps, scores, data.test_labels, eval_masks,
                                 config.eval.smoothing_sigma, config.eval.aupro_max_fpr)
    if data.test_masks is not None:
      res["mean_image_pixel_auroc"] = 0.5 * (res["image_auroc"] + res["pixel_auroc"])
    return res

  def threshold() -> float:
    share, valid = batches_lib.process_eval_indices(k)
    _, s = runner.predict_sharded(graphdef, state["params"], frozen["model"], data.support[share],
                                  config.eval.batch_size, mesh, predict_fns)
    return float(np.quantile(parallel.gather_rows(s, valid), config.eval.threshold_quantile))

  def save(step: int, force: bool = False) -> None:
    meta = _metadata(config, data, threshold(), step)
    meta["best"] = best
    ckpt.save(step, state, meta, force=force)

  eval_every = max(1, config.eval.every_epochs) * spe
  multi = jax.process_count() > 1
  final = {}
  t_start = time.perf_counter()
  with _Interrupt() as interrupt:
    step = start
    while step < total:
      batch = {k_: parallel.global_array(v, mesh) for k_, v in
               local_batch(step, k, config.train.batch_size, config.seed).items()}
      state, m = train_step(state, frozen, batch)
      step += 1
      logged = step % config.train.log_every_steps == 0 or step == total
      # A SIGTERM may reach the processes at different steps: they agree at log steps (a host sync
      # there anyway), so all of them stop and checkpoint at the same step.
      stop = (logged and parallel.any_process(interrupt.requested)) if multi else interrupt.requested
      if logged:
        m = {k_: float(v) for k_, v in jax.device_get(m).items()}
        if not np.isfinite(m["loss"]):
          raise FloatingPointError(f"non-finite loss {m['loss']} at step {step}")
        if main:
          rec = {"step": step, "epoch": step / spe, **{f"train/{k_}": v for k_, v in m.items()},
                 "elapsed_s": time.perf_counter() - t_start}
          metrics_log.write(rec)
          tb.scalars(step, {k_: v for k_, v in rec.items() if k_.startswith("train/")})
          progress.update(step, f"loss {m['loss']:.4f}")
      if step % eval_every == 0 or step == total:
        res = evaluate()
        if res[select_key] > best["score"]:
          best = {"score": res[select_key], "epoch": step // spe, "metrics": res}
        if main:
          metrics_log.write({"step": step, "epoch": step // spe, **{f"eval/{k_}": v for k_, v in res.items()}})
          tb.scalars(step, {f"eval/{k_}": v for k_, v in res.items()})
        final = res
      if step % config.train.checkpoint_every_steps == 0 or step == total or stop:
        save(step, force=True)
      if stop and step < total:
        ckpt.close()
        raise KeyboardInterrupt(f"SIGTERM: checkpoint written at step {step}; rerun to resume")
  ckpt.close()
  if progress:
    progress.close()
  if not final:  # resumed at the last step: evaluate what was restored
    final = evaluate()
  if dump_params:
    _dump_params(state["params"], os.path.join(workdir, f"params_process{jax.process_index()}.npz"))
  results = {"last_epoch": final, "best_epoch_on_test (reference protocol)": best,
             "steps": total, "wall_s": time.perf_counter() - t_start}
  if main:
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f, indent=2)
    metrics_log.close()
    tb.close()
  return results
