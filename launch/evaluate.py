"""Evaluates trained runs on their test set: image AUROC/AP/F1-max, pixel AUROC/AP/F1-max/AUPRO with masks.

  python launch/evaluate.py --workdir runs/busi_s1,runs/busi_s2,runs/busi_s3 --out results/busi.json
  python launch/evaluate.py --workdir runs/brainmri --data_root /other/copy/of/brainmri --smoothing_sigma 4
  python launch/evaluate.py --workdir runs/chest --tfds_dir data/tfds/anomaly_dataset/chest/1.0.0 --streaming
  python launch/evaluate.py --workdir runs/ldm_busi --set 'score.t_stars=(100,)' --set score.reverse_steps=25 \
      --out runs/ldm_busi/t100_s25.json   # rescore a run with other scoring settings
  python launch/evaluate.py --workdir runs/ldm_busi --set 'score.t_stars=(100,)' --untrained   # ... its untrained row

Each run directory is one seed; the JSON holds every run's metrics and their mean and std, with the
sensitivity and specificity of the run's stored decision threshold. Pictures of each run (ROC/PR/score
histogram and example panels, mediclip_jax.evaluate.figures.write_evaluation) go to --figures/<run name>.
Any method works: the run's stored config names it. Nothing is written into the run directories
unless --out or --figures points there (the defaults are <first workdir>/eval.json and eval_figures/).
"""
from __future__ import annotations

import ast
import json
import os
import sys
import traceback

import numpy as np
from absl import app, flags

from data_pipelines import run_data
from mediclip_jax import config_utils, parallel
from mediclip_jax.evaluate import figures, restore, scoring
from mediclip_jax.evaluate.normalization import Normalization
from mediclip_jax.train import writers

_WORKDIR = flags.DEFINE_list("workdir", None, "Run directories (comma-separated; one per seed).")
_OUT = flags.DEFINE_string("out", None, "Results JSON (default: <first workdir>/eval.json).")
_DATA_ROOT = flags.DEFINE_string("data_root", None, "Override the dataset root stored in the run's config.")
_TFDS_DIR = flags.DEFINE_string("tfds_dir", None, "Read the test set from this TFDS build (launch/prepare_data.py) "
                                "instead of the run's data source.")
_STREAMING = flags.DEFINE_bool("streaming", None, "Stream the test set with bounded host memory (histogram pixel "
                               "metrics with error bounds); default: the run's eval.streaming.")
_SIGMA = flags.DEFINE_float("smoothing_sigma", None, "Gaussian smoothing of maps (0 = raw; default: the run's).")
_BATCH = flags.DEFINE_integer("batch_size", None, "Evaluation batch (default: the run's eval.batch_size).")
_SET = flags.DEFINE_multi_string("set", [], "section.field=value: change a scoring setting of the stored config "
                                 "(sections score and eval only; the trained model is not touched), e.g. "
                                 "score.reverse_steps=25. Recorded in the results JSON under \"set\".")
_UNTRAINED = flags.DEFINE_bool("untrained", False, "Score the method's initial state (the run's config and seed, "
                                "zero steps) instead of its checkpoint: the untrained row under any --set; the "
                                "decision threshold is calibrated on the support images.")
SETTABLE = ("score", "eval")  # what may differ between training and a rescoring of its checkpoint
_FIGURES = flags.DEFINE_string("figures", None, "Folder for each run's pictures (default: <--out without .json>"
                               "_figures; empty: none).")


def parse_settings(items: list[str]) -> dict:
  """{"section.field": value} from --set items; values are Python literals (else strings)."""
  out = {}
  for item in items:
    path, sep, text = item.partition("=")
    if not sep or "." not in path:
      raise ValueError(f"--set {item!r}: expected section.field=value")
    if path.split(".")[0] not in SETTABLE:
      raise ValueError(f"--set {path}: only scoring settings can change at evaluation (sections "
                       f"{', '.join(SETTABLE)}); {path} belongs to the trained model or its training")
    try:
      out[path] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      out[path] = text
  return out


def apply_settings(config, settings: dict, workdir: str) -> None:
  """Writes --set values into a stored config; a field it does not have, or a value of another type, is an error."""
  for path, value in settings.items():
    *parents, leaf = path.split(".")
    node = config
    for key in parents:
      if key not in node:
        raise ValueError(f"--set {path}: {workdir}'s config has no section {key!r}")
      node = node[key]
    if leaf not in node:
      raise ValueError(f"--set {path}: {workdir}'s config has no field {leaf!r} in {'.'.join(parents)}")
    try:
      node[leaf] = value
    except TypeError as e:
      raise ValueError(f"--set {path}={value!r}: {e}") from e


def evaluate_run(workdir: str, mesh, figures_dir: str | None, settings: dict) -> dict:
  """Metrics of one run's latest checkpoint on its test set; its pictures in `figures_dir` (unless None)."""
  config, _ = restore.stored_config(workdir)
  with config.unlocked():
    apply_settings(config, settings, workdir)
    if _DATA_ROOT.value:
      config.data.root, config.data.phantom, config.data.source = _DATA_ROOT.value, False, "files"
    if _SIGMA.value is not None:
      if _SIGMA.value < 0:
        raise ValueError(f"--smoothing_sigma must be >= 0, got {_SIGMA.value}")
      config.eval.smoothing_sigma = _SIGMA.value
    if _BATCH.value is not None:
      if _BATCH.value < 1:
        raise ValueError(f"--batch_size must be >= 1, got {_BATCH.value}")
      config.eval.batch_size = _BATCH.value
  if _TFDS_DIR.value:
    with config.unlocked():
      config.data.source, config.data.tfds_dir, config.data.phantom = "tfds", _TFDS_DIR.value, False
  if _STREAMING.value is not None:
    config.eval.streaming = _STREAMING.value
  if not run_data.dataset_root(config.data, workdir):
    raise ValueError(f"{workdir}: the stored config has no data.root; pass --data_root or --tfds_dir")
  dataset = run_data.read_dataset(config.data, workdir)
  run = restore.load_run(workdir, mesh, config=config, dataset=dataset, untrained=_UNTRAINED.value)
  for problem in run.problems:
    print(f"WARNING: {problem}; evaluating step {run.step} instead", file=sys.stderr)
  if run.metadata.get("normalization"):
    norm = Normalization.from_dict(run.metadata["normalization"], f"{workdir} step {run.step}")
  else:  # a checkpoint written on SIGTERM before calibration: calibrate on the run's support images now
    norm = scoring.calibrate(run.trainable.scorer(run.state), run.trainable.calibration_images,
                             int(config.eval.batch_size), mesh, run.trainable.threshold)
    if not _UNTRAINED.value:
      print(f"{workdir}: checkpoint step {run.step} was written on SIGTERM without a threshold; calibrated it "
            "now on the support images", file=sys.stderr)
  test = run_data.test_set(dataset, config.data, streaming=config.eval.streaming)
  main = parallel.is_main_process()
  with writers.count_bar(len(test), f"evaluating {workdir}", enabled=main) as bar:
    reconstructor = run.trainable.reconstructor
    res, scores, examples = scoring.evaluate(run.trainable.scorer(run.state), test, config.eval, mesh,
                                             norm.threshold, bar.update,
                                             calibration_images=run.trainable.calibration_images,
                                             reconstruct=reconstructor(run.state) if reconstructor else None)
  if figures_dir is not None and main:
    figures.write_evaluation(figures_dir, scores, test.labels, examples, test.example, norm)
  res.update(step=run.step, seed=int(config.seed), n_test=int(len(test)),
             smoothing_sigma=float(config.eval.smoothing_sigma), threshold=norm.threshold)
  return res


def main(argv) -> int:
  del argv
  writers.configure_logging(flags.FLAGS.verbosity)
  mesh = parallel.make_mesh()
  out = _OUT.value or os.path.join(_WORKDIR.value[0], "eval.json")
  if os.path.isdir(out):
    print(f"error: --out {out} is a directory; give a file path", file=sys.stderr)
    return 1
  skip = {"step", "seed", "n_test", "smoothing_sigma", "threshold"}
  fig_root = os.path.splitext(out)[0] + "_figures" if _FIGURES.value is None else _FIGURES.value
  names = [os.path.basename(os.path.normpath(wd)) for wd in _WORKDIR.value]
  per_run = {}
  try:
    settings = parse_settings(_SET.value)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  for i, wd in enumerate(_WORKDIR.value):
    name = names[i] if names.count(names[i]) == 1 else f"{i}_{names[i]}"
    try:
      res = evaluate_run(wd, mesh, os.path.join(fig_root, name) if fig_root else None, settings)
    except (OSError, ValueError) as e:  # DatasetError, DamagedCheckpoint: ValueErrors
      if flags.FLAGS.verbosity >= 1:
        traceback.print_exc()
      print(f"error: {e}", file=sys.stderr)
      return 1
    per_run[wd] = res
    print(f"{wd} (step {res['step']}): " + " ".join(f"{k} {v:.3f}" for k, v in res.items() if k not in skip))
  keys = sorted(set.intersection(*(set(r) for r in per_run.values())) - skip)
  summary = {k: {"mean": float(np.mean([r[k] for r in per_run.values()])),
                 "std": float(np.std([r[k] for r in per_run.values()]))} for k in keys}
  if parallel.is_main_process():
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
      json.dump({"runs": per_run, "mean_over_runs": summary, "set": settings, "untrained": _UNTRAINED.value}, f,
                indent=2)
    print(writers.summary_table({wd: {k: r[k] for k in keys} for wd, r in per_run.items()}))
    print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=config_utils.parse_flags)
