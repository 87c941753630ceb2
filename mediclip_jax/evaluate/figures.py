"""Pictures that explain a prediction: a per-image anomaly panel and ROC / PR / score-histogram curves;
`write_evaluation` draws both for one evaluation of a test set.

The anomaly map is drawn on a FIXED 0-1 scale (the scale the score and threshold live on), never
min-max normalised per image, so a normal image looks cold and the colour bar can be read off.
"""
from __future__ import annotations

import dataclasses
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from mediclip_jax.evaluate.normalization import Normalization  # noqa: E402

CMAP = "jet"
_ABNORMAL_RGB = (220, 30, 30)
_NORMAL_RGB = (20, 150, 40)


def colorize(values: np.ndarray) -> np.ndarray:
  """Values on the fixed 0-1 scale (clipped) -> (..., 3) uint8 colours of the panel's colour map."""
  rgba = np.asarray(matplotlib.colormaps[CMAP](np.clip(np.asarray(values, np.float64), 0.0, 1.0)))
  return (rgba[..., :3] * 255).round().astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class PanelLayout:
  """Where things are in a panel: header rows, the left x of each column, the colour bar's value rows."""
  height: int  # image rows
  width: int  # image columns
  header: int  # text rows above the images
  columns: dict[str, int]  # column name -> left x
  colorbar_width: int
  total_width: int

  def colorbar_row(self, value: float) -> int:
    """Panel row where the colour bar shows `value` (1 at the top, 0 at the bottom)."""
    return self.header + int(round((1.0 - float(np.clip(value, 0, 1))) * (self.height - 1)))


def panel_layout(height: int, width: int, with_mask: bool) -> PanelLayout:
  """The layout `anomaly_panel` uses for images of (height, width)."""
  font = _font_size(height)
  header = 2 * (font + 6)
  gap = max(2, width // 64)
  bar = max(8, width // 16)
  labels = 5 * font // 2 + 6  # room for "0.50" beside the bar
  columns, x = {}, 0
  for name in ("image", "mask", "map") if with_mask else ("image", "map"):
    columns[name] = x
    x += width + gap
  columns["colorbar"] = x
  x += bar + labels + gap
  for name in ("pred", "overlay"):
    columns[name] = x
    x += width + gap
  return PanelLayout(height, width, header, columns, bar, x - gap)


def _font_size(height: int) -> int:
  return int(np.clip(height // 22, 10, 28))


def rgb_uint8(image, keep_alpha: bool = False) -> np.ndarray:
  """Grey (H,W), (H,W,1) or RGB(A) (H,W,3|4), uint8 or float in [0,1] (clipped, rounded) -> (H,W,3) uint8;
  RGBA stays (H,W,4) with `keep_alpha`. What panels draw on and what TensorBoard images are written as."""
  a = np.asarray(image)
  if a.ndim == 2:
    a = a[..., None]
  if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
    raise ValueError(f"expected an (H,W) or (H,W,C) image with 1, 3 or 4 channels, got shape {a.shape}")
  if a.dtype != np.uint8:
    a = (np.clip(a.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
  if a.shape[-1] == 1:
    return np.repeat(a, 3, axis=-1)
  return a if keep_alpha else a[..., :3]


def _resize(a: np.ndarray, height: int, width: int, resample) -> np.ndarray:
  a = np.asarray(a, np.float32)
  if a.shape == (height, width):
    return a
  return np.asarray(Image.fromarray(a, mode="F").resize((width, height), resample), np.float32)


def _edge(m: np.ndarray) -> np.ndarray:
  """Boundary pixels of a boolean mask (pixels with a 4-neighbour outside it)."""
  p = np.pad(m, 1, constant_values=False)
  inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
  e = m & ~inner
  wide = e.copy()  # two pixels wide: still visible when the picture is shown smaller
  wide[1:] |= e[:-1]
  wide[:, 1:] |= e[:, :-1]
  return wide


def anomaly_panel(image: np.ndarray, amap: np.ndarray, threshold: float, score: float, *,
                  mask: np.ndarray | None = None, name: str = "", original: np.ndarray | None = None,
                  raw_score: float | None = None) -> np.ndarray:
  """One image's explanation as an (H', W', 3) uint8 picture.

  Columns: image | ground truth (when `mask` is given) | anomaly map on the fixed 0-1 scale with its
  colour bar (threshold marked) | predicted mask (map > threshold) | overlay (map blended on the image,
  predicted region outlined white, ground truth magenta). Above them: name, score, threshold, decision.
  `image` is what the model saw; with `original` (the file's pixels) everything is drawn at the original
  resolution, the map upsampled bilinearly to it. Callers pass normalised maps and scores
  (`mediclip_jax.evaluate.normalization`: threshold 0.5) and the `raw_score` to print beside them.
  """
  base = rgb_uint8(original if original is not None else image)
  h, w = base.shape[:2]
  m = np.asarray(amap, np.float32)
  if m.ndim != 2:
    raise ValueError(f"anomaly map must be (H,W), got shape {m.shape}")
  m = _resize(m, h, w, Image.BILINEAR)
  pred = m > threshold
  gt = None if mask is None else _resize(np.asarray(mask, np.float32), h, w, Image.NEAREST) > 0.5
  lay = panel_layout(h, w, gt is not None)
  panel = np.full((lay.header + h, lay.total_width, 3), 255, np.uint8)

  def put(col, pix):
    panel[lay.header:, lay.columns[col]:lay.columns[col] + pix.shape[1]] = pix

  put("image", base)
  if gt is not None:
    put("mask", np.repeat((gt * 255).astype(np.uint8)[..., None], 3, -1))
  heat = colorize(m)
  put("map", heat)
  levels = 1.0 - np.arange(h) / max(h - 1, 1)
  put("colorbar", np.repeat(colorize(levels)[:, None], lay.colorbar_width, 1))
  put("pred", np.repeat((pred * 255).astype(np.uint8)[..., None], 3, -1))
  over = (0.5 * base.astype(np.float32) + 0.5 * heat.astype(np.float32)).round().astype(np.uint8)
  over[_edge(pred)] = 255
  if gt is not None:
    over[_edge(gt)] = (255, 0, 255)  # magenta: stands out on every colour of the map
  put("overlay", over)

  img = Image.fromarray(panel)
  draw = ImageDraw.Draw(img)
  fs = _font_size(h)
  font = ImageFont.load_default(size=fs)
  abnormal = bool(score > threshold)
  raw = "" if raw_score is None else f" (raw {raw_score:.4f})"
  line = (f"{name + ': ' if name else ''}score {score:.3f}{raw} {'>' if abnormal else '<='} threshold "
          f"{threshold:.3g} -> {'ABNORMAL' if abnormal else 'normal'}")
  draw.text((2, 2), line, fill=_ABNORMAL_RGB if abnormal else _NORMAL_RGB, font=font)
  titles = {"image": "image", "mask": "ground truth", "map": f"map (threshold {threshold:.3g})", "pred": "map > threshold",
            "overlay": "overlay"}
  for col, title in titles.items():
    if col in lay.columns:
      draw.text((lay.columns[col] + 2, fs + 8), title, fill=(0, 0, 0), font=font)
  x_lab = lay.columns["colorbar"] + lay.colorbar_width + 2
  for v in (0.0, 0.5, 1.0):
    y = min(max(lay.colorbar_row(v) - fs // 2, lay.header), lay.header + h - fs - 2)
    draw.text((x_lab, y), f"{v:.1f}", fill=(0, 0, 0), font=font)
  if 0.0 <= threshold <= 1.0:  # the threshold as a black tick across the bar
    y = lay.colorbar_row(threshold)
    x0 = lay.columns["colorbar"]
    draw.line([(x0, y), (x0 + lay.colorbar_width + 1, y)], fill=(0, 0, 0), width=max(1, h // 256))
  return np.asarray(img)


def write_panel(path: str, *args, **kwargs) -> None:
  """`anomaly_panel(*args, **kwargs)` saved as a PNG at `path`."""
  Image.fromarray(anomaly_panel(*args, **kwargs)).save(path)


RESIDUAL_SCALE = 0.5  # |x - x_hat| shown on a fixed 0..0.5 scale (grey levels in [0, 1]), comparable across images


def reconstruction_panel(image: np.ndarray, reconstruction: np.ndarray, name: str = "") -> np.ndarray:
  """A reconstruction method's view of one image as a uint8 picture: image | pseudo-healthy reconstruction |
  residual |x - x_hat| (colour map on a fixed 0..RESIDUAL_SCALE scale), at the model's size, enlarged by
  pixel repetition to at least 160 px so the titles fit; the name in a header line above."""
  x = np.asarray(image, np.float32)
  x = x.mean(-1) if x.ndim == 3 else x
  r = np.asarray(reconstruction, np.float32)
  if r.shape != x.shape:
    raise ValueError(f"reconstruction {r.shape} must have the image's shape {x.shape}")
  zoom = max(1, -(-160 // min(x.shape)))
  up = lambda a: np.repeat(np.repeat(a, zoom, axis=0), zoom, axis=1)
  columns = {"image": rgb_uint8(up(x)), "pseudo-healthy": rgb_uint8(up(r)),
             f"|x - x_hat|, 0..{RESIDUAL_SCALE:g}": colorize(up(np.abs(x - r)) / RESIDUAL_SCALE)}
  h, w = columns["image"].shape[:2]
  fs = _font_size(h)
  header, gap = 2 * (fs + 6), max(2, w // 64)
  panel = np.full((header + h, 3 * w + 2 * gap, 3), 255, np.uint8)
  for i, pix in enumerate(columns.values()):
    panel[header:, i * (w + gap):i * (w + gap) + w] = pix
  img = Image.fromarray(panel)
  draw = ImageDraw.Draw(img)
  font = ImageFont.load_default(size=fs)
  draw.text((2, 2), name, fill=(0, 0, 0), font=font)
  for i, title in enumerate(columns):
    draw.text((i * (w + gap) + 2, fs + 8), title, fill=(0, 0, 0), font=font)
  return np.asarray(img)


def write_reconstruction(path: str, *args, **kwargs) -> None:
  """`reconstruction_panel(*args, **kwargs)` saved as a PNG at `path`."""
  Image.fromarray(reconstruction_panel(*args, **kwargs)).save(path)


def _roc(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(FPR, TPR, precision, recall) over thresholds `score >= t`, ties grouped."""
  order = np.argsort(-scores, kind="stable")
  s, y = scores[order], labels[order]
  last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each distinct score
  tp = np.cumsum(y)[last]
  fp = (last + 1) - tp
  pos, neg = max(y.sum(), 1), max(len(y) - y.sum(), 1)
  tpr, fpr = np.r_[0, tp / pos], np.r_[0, fp / neg]
  precision, recall = tp / (tp + fp), tp / pos
  return fpr, tpr, precision, recall


def roc_pr_hist(scores: np.ndarray, labels: np.ndarray, threshold: float, path: str) -> dict[str, float]:
  """Writes ROC (with AUROC), PR (with AP) and normal-vs-abnormal score histograms (threshold line) as one
  PNG at `path`; returns {"auroc", "ap"}."""
  scores = np.asarray(scores, np.float64).ravel()
  labels = np.asarray(labels).ravel().astype(bool)
  if scores.shape != labels.shape or not labels.any() or labels.all():
    raise ValueError("roc_pr_hist needs one label per score and both normal (0) and abnormal (1) images")
  fpr, tpr, precision, recall = _roc(scores, labels)
  auroc = float(np.trapezoid(tpr, fpr))
  ap = float(np.sum(np.diff(np.r_[0, recall]) * precision))
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), dpi=100)
  ax = axes[0]
  ax.plot(fpr, tpr, color="C0", lw=2, label=f"AUROC {auroc:.3f}")
  ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1)
  ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC", xlim=(0, 1), ylim=(0, 1.02))
  ax.legend(loc="lower right")
  ax = axes[1]
  ax.step(np.r_[0, recall], np.r_[precision[0], precision], where="pre", color="C1", lw=2, label=f"AP {ap:.3f}")
  ax.axhline(labels.mean(), color="0.6", ls="--", lw=1, label=f"chance {labels.mean():.2f}")
  ax.set(xlabel="recall", ylabel="precision", title="precision-recall", xlim=(0, 1), ylim=(0, 1.02))
  ax.legend(loc="lower left")
  ax = axes[2]
  bins = np.linspace(min(scores.min(), threshold), max(scores.max(), threshold), 31)
  if bins[0] == bins[-1]:
    bins = np.linspace(bins[0] - 0.5, bins[0] + 0.5, 31)
  ax.hist(scores[~labels], bins=bins, alpha=0.6, color="C2", label=f"normal (n={int((~labels).sum())})")
  ax.hist(scores[labels], bins=bins, alpha=0.6, color="C3", label=f"abnormal (n={int(labels.sum())})")
  ax.axvline(threshold, color="k", ls="--", lw=1.5, label=f"threshold {threshold:.3f}")
  ax.set(xlabel="anomaly score", ylabel="images", title="score distribution")
  ax.legend(loc="upper right")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return {"auroc": auroc, "ap": ap}


# The test images an evaluation draws: the clearest and the hardest case of each class.
EXAMPLES = {"abnormal_highest": (1, -1), "abnormal_lowest": (1, 0), "normal_highest": (0, -1), "normal_lowest": (0, 0)}


def pick_examples(scores: np.ndarray, labels: np.ndarray) -> dict[str, int]:
  """Role -> test index: the highest- and lowest-scoring abnormal and normal images (roles of an absent
  class left out; ties go to the earlier image)."""
  scores, labels = np.asarray(scores), np.asarray(labels)
  out = {}
  for role, (label, end) in EXAMPLES.items():
    idx = np.flatnonzero(labels == label)
    if idx.size:
      out[role] = int(idx[np.argsort(scores[idx], kind="stable")][end])
  return out


def write_evaluation(outdir: str, scores: np.ndarray, labels: np.ndarray, examples: dict, read_example,
                     norm: Normalization) -> dict[str, np.ndarray]:
  """One evaluation's pictures in `outdir`: roc_pr_hist.png (raw scores, decision threshold marked; when
  both classes are present) and a panel per example role (`pick_examples`), `<role>.png`, at the image's
  original resolution with its ground truth, the map normalised (threshold 0.5). `examples` is role ->
  (test index, raw map); `read_example(i)` gives test image i as (pixels, mask or None, name), e.g.
  `data_pipelines.run_data.TestSet.example`. Returns {name: picture} (for TensorBoard)."""
  os.makedirs(outdir, exist_ok=True)
  pictures = {}
  if 0 < int(np.sum(labels)) < len(labels):
    path = os.path.join(outdir, "roc_pr_hist.png")
    roc_pr_hist(scores, labels, norm.threshold, path)
    pictures["roc_pr_hist"] = np.asarray(Image.open(path).convert("RGB"))
  for role, (i, raw_map) in examples.items():
    original, mask, name = read_example(i)
    panel = anomaly_panel(None, norm(raw_map), 0.5, float(norm(scores[i])), raw_score=float(scores[i]),
                          mask=mask, name=name, original=original)
    Image.fromarray(panel).save(os.path.join(outdir, f"{role}.png"))
    pictures[role] = panel
  return pictures
