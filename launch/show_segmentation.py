"""Pictures of a trained run's segmentations: input, reconstruction, anomaly map, both masks, ground truth.

For a few abnormal test images of each class (grade) and a few normal ones, one row each: the input,
the pseudo-healthy reconstruction (reconstruction methods), the anomaly map, the residual-threshold mask,
the layer-wise mask with the traced layer boundaries (reconstruction methods), and the lesion mask. The
thresholds are calibrated on the run's normal calibration images exactly as its evaluation does
(mediclip_jax/evaluate/analysis.py), so the masks are the ones its Dice figures count.

  python launch/show_segmentation.py --workdir runs/ssl_oct --out runs/ssl_oct/segmentation.png --per_class 2
"""
from __future__ import annotations

import os

import matplotlib
import numpy as np
from absl import app, flags

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from data_pipelines import run_data  # noqa: E402
from mediclip_jax import config_utils, parallel  # noqa: E402
from mediclip_jax.evaluate import analysis, oct_layers, restore, scoring, segmentation  # noqa: E402
from mediclip_jax.train import writers  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run directory.", required=True)
_OUT = flags.DEFINE_string("out", None, "PNG to write (default: <workdir>/segmentation.png).")
_PER_CLASS = flags.DEFINE_integer("per_class", 2, "Images per test class name (grade), normals included.")
_DATA_ROOT = flags.DEFINE_string("data_root", None, "Override the dataset root stored in the run's config.")


def pick(test: run_data.TestSet, per_class: int) -> list[int]:
  """The first `per_class` test images of every class name (abnormal classes first, then normal)."""
  chosen: dict[str, list[int]] = {}
  for i, (name, label) in enumerate(zip(test.class_names, test.labels)):
    key = f"{1 - int(label)}:{name}"
    if len(chosen.setdefault(key, [])) < per_class:
      chosen[key].append(i)
  return [i for key in sorted(chosen) for i in chosen[key]]


def main(argv) -> int:
  del argv
  writers.configure_logging(flags.FLAGS.verbosity)
  workdir = _WORKDIR.value
  config, _ = restore.stored_config(workdir)
  if _DATA_ROOT.value:
    with config.unlocked():
      config.data.root, config.data.phantom, config.data.source = _DATA_ROOT.value, False, "files"
  with config.unlocked():
    config.eval.segmentation.threshold = True
  mesh = parallel.make_mesh()
  dataset = run_data.read_dataset(config.data, workdir)
  run = restore.load_run(workdir, mesh, config=config, dataset=dataset)
  test = run_data.test_set(dataset, config.data)
  if not test.has_masks:
    raise ValueError(f"{dataset.root}: the test set has no lesion masks to compare segmentations with")
  chosen = pick(test, _PER_CLASS.value)
  images, masks = test.arrays()
  images, masks = images[chosen], masks[chosen] != 0
  scorer = run.trainable.scorer(run.state)
  reconstruct = run.trainable.reconstructor(run.state) if run.trainable.reconstructor else None
  share = lambda fn, x: scoring.score_share(fn, x, int(config.eval.batch_size), mesh)  # noqa: E731
  acc = analysis.start(config.eval, test, scorer, reconstruct, run.trainable.calibration_images, mesh, share)
  maps, scores = share(scorer, images)
  x_hat = None
  if reconstruct is not None:
    x_hat = share(lambda g: (lambda r: (r, r[:, 0, 0]))(reconstruct(g)), images)[0]
  masks_by_kind = acc.segment(images, maps, x_hat)
  columns = ["input"] + (["reconstruction"] if x_hat is not None else []) + ["anomaly map"] + \
      [f"{k} mask" for k in masks_by_kind] + ["lesion mask"]
  fig, axes = plt.subplots(len(chosen), len(columns), figsize=(2.2 * len(columns), 2.3 * len(chosen)), squeeze=False)
  vmax = float(np.quantile(maps, 0.999)) or 1.0
  grey = images.mean(-1) if images.ndim == 4 else images
  for r, i in enumerate(chosen):
    panels = [("gray", grey[r], 0, 1)] + ([("gray", x_hat[r], 0, 1)] if x_hat is not None else [])
    panels += [("inferno", maps[r], 0, vmax)] + [("gray", m[r], 0, 1) for m in masks_by_kind.values()]
    panels += [("gray", masks[r], 0, 1)]
    for c, (cmap, img, lo, hi) in enumerate(panels):
      ax = axes[r, c]
      ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
      if masks[r].any() and c < len(panels) - 1:
        ax.contour(masks[r], levels=[0.5], colors="cyan", linewidths=0.6)
      if columns[c] == "layers mask" and x_hat is not None:
        rows = oct_layers.trace_boundaries(x_hat[r], int(config.eval.segmentation.boundaries))
        for b in rows:
          ax.plot(np.arange(len(b)), b, lw=0.4, color="lime")
      if columns[c].endswith(" mask") and columns[c] != "lesion mask" and masks[r].any():
        dice, _ = segmentation.dice_iou(panels[c][1], masks[r])
        ax.set_xlabel(f"Dice {dice:.2f}", fontsize=7)
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title(columns[c], fontsize=8)
    axes[r, 0].set_ylabel(f"{test.class_names[i]}\nA={scores[r]:.4f}", fontsize=7)
  fig.suptitle(f"{config.method}, step {run.step}, seed {config.seed}: cyan = lesion outline"
               + (", green = layer boundaries traced on the reconstruction" if "layers" in masks_by_kind else ""),
               fontsize=8)
  fig.tight_layout()
  out = _OUT.value or os.path.join(workdir, "segmentation.png")
  fig.savefig(out, dpi=110)
  print(f"wrote {out} ({len(chosen)} images; pixel threshold {acc.cal.get('pixel_threshold', float('nan')):.4f})")
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=config_utils.parse_flags)
