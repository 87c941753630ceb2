"""Evaluates trained runs on their test set: image AUROC/AP/F1-max, pixel AUROC/AP/F1-max/AUPRO with masks.

  python launch/evaluate.py --workdir runs/busi_s1 runs/busi_s2 runs/busi_s3 --out results/busi.json
  python launch/evaluate.py --workdir runs/brainmri --data_root /other/copy/of/brainmri --smoothing_sigma 4

Each run directory is one seed; the JSON holds every run's metrics and their mean and std.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", nargs="+", required=True, help="run directories (one per seed)")
  p.add_argument("--out", default=None, help="results JSON (default: <first workdir>/eval.json)")
  p.add_argument("--data_root", default=None, help="override the dataset root stored in the run's config")
  p.add_argument("--smoothing_sigma", type=float, default=None, help="Gaussian smoothing of maps (0 = raw)")
  p.add_argument("--batch_size", type=int, default=None)
  args = p.parse_args(argv)

  from mediclip_jax.evaluate import runner  # pylint: disable=import-outside-toplevel
  from mediclip_jax.evaluate.restore import load_trained  # pylint: disable=import-outside-toplevel
  from mediclip_jax.train.loop import prepare_data  # pylint: disable=import-outside-toplevel

  per_run = {}
  for wd in args.workdir:
    try:
      t = load_trained(wd)
    except FileNotFoundError as e:
      print(f"error: {e}", file=sys.stderr)
      return 1
    cfg = t.config
    with cfg.unlocked():
      if args.data_root:
        cfg.data.root, cfg.data.phantom = args.data_root, False
      cfg.data.support_file = os.path.join(wd, "support_set.json")
    data = prepare_data(cfg, wd)
    sigma = cfg.eval.smoothing_sigma if args.smoothing_sigma is None else args.smoothing_sigma
    maps, scores = runner.predict(t.graphdef, t.params, t.frozen, data.test_images,
                                  args.batch_size or cfg.eval.batch_size)
    res = runner.compute_metrics(maps, scores, data.test_labels, data.test_masks, sigma, cfg.eval.aupro_max_fpr)
    res.update(step=t.step, seed=int(cfg.seed), n_test=int(len(data.test_labels)), smoothing_sigma=sigma)
    per_run[wd] = res
    print(json.dumps({wd: res}, indent=2))
  keys = sorted(set.intersection(*(set(r) for r in per_run.values())) - {"step", "seed", "n_test", "smoothing_sigma"})
  summary = {k: {"mean": float(np.mean([r[k] for r in per_run.values()])),
                 "std": float(np.std([r[k] for r in per_run.values()]))} for k in keys}
  out = args.out or os.path.join(args.workdir[0], "eval.json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump({"runs": per_run, "mean_over_runs": summary}, f, indent=2)
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
