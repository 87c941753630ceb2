"""VAE quality gate: round-trip PSNR/SSIM on a dataset's support set, optionally CLIP feature cosine.

  python launch/check_vae.py --data ../shared/data/brainmri,../shared/data/busi
  python launch/check_vae.py --data ../shared/data/busi --vae_kind autoencoder_kl --vae_path ckpt/sd-vae-ft-mse \\
      --clip ckpt/vit_l14 --min_psnr 28 --min_ssim 0.8 --min_clip_cos 0.95

Prints one row per dataset and exits with status 1 when any dataset's mean PSNR, SSIM (or
CLIP cosine, with --clip) is below its threshold, so latent tasks can be refused for a VAE
that is too lossy on the data (status 2: the VAE or a dataset cannot be read).
"""
from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from data_pipelines import normal_images
from mediclip_jax.evaluate.image_quality import psnr, ssim
from mediclip_jax.models import vae as V
from mediclip_jax.models.clip import clip_normalize, load_clip
from mediclip_jax.weights.io import CheckpointError

REPO = Path(__file__).resolve().parents[1]

_DATA = flags.DEFINE_list("data", None, "Comma-separated dataset roots (any layout data_pipelines reads).")
_VAE_KIND = flags.DEFINE_enum("vae_kind", V.KIND_TAEF2, [V.KIND_TAEF2, V.KIND_KL], "VAE kind.")
_VAE_PATH = flags.DEFINE_string("vae_path", str(REPO.parent / "shared" / "weights" / "taef2"),
                                "taef2: directory with taef2_{encoder,decoder}.pth; autoencoder_kl: diffusers "
                                "directory or checkpoint file.")
_VAE_DTYPE = flags.DEFINE_string("vae_dtype", "float32", "VAE compute dtype (float32 or bfloat16).")
_SIZE = flags.DEFINE_integer("size", 256, "Images are resized to size×size.")
_NUM = flags.DEFINE_integer("num", 0, "First N support images (0 = all).")
_BATCH = flags.DEFINE_integer("batch", 8, "Images per jitted round trip.")
_MIN_PSNR = flags.DEFINE_float("min_psnr", 30.0, "dB, on the mean over the support set.")
_MIN_SSIM = flags.DEFINE_float("min_ssim", 0.85, "On the mean over the support set.")
_CLIP = flags.DEFINE_string("clip", None, "CLIP checkpoint (file or directory) for the feature cosine.")
_MIN_CLIP_COS = flags.DEFINE_float("min_clip_cos", 0.95, "With --clip, on the mean.")

flags.mark_flag_as_required("data")


def _batches(x: np.ndarray, batch: int):
  """Fixed-size batches (the last one padded by repetition) so one compiled program serves all."""
  for i in range(0, len(x), batch):
    chunk = x[i:i + batch]
    n = len(chunk)
    if n < batch:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
    yield chunk, n


def make_round_trip(vae):
  """x -> (D(E(x)), PSNR, SSIM) per image, jitted: the grey round trip latent synthesis runs."""
  codec = V.codec(vae)

  @jax.jit
  def rt(state, x):
    y = codec.decode(state, codec.encode(state, x))
    return y, psnr(y, x), ssim(y, x)
  return lambda x: rt(codec.state, x)


def make_clip_cosine(path: str):
  """Cosine similarity of the CLIP image embeddings of x and D(E(x)) (CLIP read by models.clip.load_clip)."""
  clip = load_clip(path)
  size = clip.cfg.image_size
  graphdef, state = nnx.split(clip)

  @jax.jit
  def cos(state, x, y):
    m = nnx.merge(graphdef, state)

    def emb(v):
      v = jax.image.resize(v, (v.shape[0], size, size), "bilinear")
      e = m.encode_image(clip_normalize(v)).astype(jnp.float32)
      return e / jnp.linalg.norm(e, axis=-1, keepdims=True)
    return jnp.sum(emb(x) * emb(y), axis=-1)
  return lambda x, y: cos(state, x, y)


def check_dataset(root: str, rt, clip_cos) -> tuple[str, list[str]]:
  """One dataset's table row and the names of the thresholds it falls below."""
  images, _ = normal_images.load_normal_images(root, _SIZE.value, _NUM.value)
  ps, ss, cs = [], [], []
  for chunk, n in _batches(images, _BATCH.value):
    y, p, s = rt(jnp.asarray(chunk))
    ps.append(np.asarray(p)[:n])
    ss.append(np.asarray(s)[:n])
    if clip_cos:
      cs.append(np.asarray(clip_cos(jnp.asarray(chunk), y))[:n])
  ps, ss = np.concatenate(ps), np.concatenate(ss)
  name = Path(root.rstrip("/")).name
  row = f"{name:<12} {len(ps):>3} {ps.mean():>9.2f} {ps.min():>8.2f} {ss.mean():>9.4f} {ss.min():>8.4f}"
  bad = []
  if ps.mean() < _MIN_PSNR.value:
    bad.append("PSNR")
  if ss.mean() < _MIN_SSIM.value:
    bad.append("SSIM")
  if clip_cos:
    cs = np.concatenate(cs)
    row += f" {cs.mean():>8.4f} {cs.min():>8.4f}"
    if cs.mean() < _MIN_CLIP_COS.value:
      bad.append("CLIP cos")
  return row, bad


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  cfg = V.default_config()
  cfg.kind, cfg.path, cfg.dtype = _VAE_KIND.value, _VAE_PATH.value, _VAE_DTYPE.value
  try:
    vae = V.load_vae(cfg)
  except (CheckpointError, ValueError) as e:
    print(f"cannot load the VAE: {e}", file=sys.stderr)
    return 2
  if _SIZE.value % vae.downscale:
    print(f"--size {_SIZE.value}: must be a multiple of the VAE's downscale factor {vae.downscale}", file=sys.stderr)
    return 2
  rt = make_round_trip(vae)
  clip_cos = make_clip_cosine(_CLIP.value) if _CLIP.value else None

  header = f"{'dataset':<12} {'n':>3} {'PSNR mean':>9} {'PSNR min':>8} {'SSIM mean':>9} {'SSIM min':>8}"
  if clip_cos:
    header += f" {'CLIP cos':>8} {'cos min':>8}"
  print(f"VAE {_VAE_KIND.value} ({_VAE_PATH.value}), {_SIZE.value}², thresholds: PSNR ≥ {_MIN_PSNR.value} dB, "
        f"SSIM ≥ {_MIN_SSIM.value}" + (f", CLIP cos ≥ {_MIN_CLIP_COS.value}" if clip_cos else ""))
  print(header)
  failed = []
  for root in [r for r in _DATA.value if r]:
    try:
      row, bad = check_dataset(root, rt, clip_cos)
    except ValueError as e:  # a dataset that cannot be read (DatasetError) or has no normal images
      print(f"cannot read {root}: {e}", file=sys.stderr)
      return 2
    print(row + ("  BELOW: " + ", ".join(bad) if bad else ""))
    if bad:
      failed.append(f"{Path(root.rstrip('/')).name} ({', '.join(bad)})")
  if failed:
    print(f"FAIL: below threshold on {'; '.join(failed)}; latent tasks should not use this VAE", file=sys.stderr)
    return 1
  print("OK: the VAE passes the quality gate")
  return 0


if __name__ == "__main__":
  app.run(main)
