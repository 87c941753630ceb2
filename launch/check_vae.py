"""VAE quality gate (DESIGN §7): round-trip PSNR/SSIM on a dataset's support set, optionally CLIP feature cosine.

  python launch/check_vae.py --data ../shared/data/brainmri,../shared/data/busi
  python launch/check_vae.py --data ../shared/data/busi --vae_kind autoencoder_kl --vae_path ckpt/sd-vae-ft-mse \
      --clip ckpt/vit_l14 --min_psnr 28 --min_ssim 0.8 --min_clip_cos 0.95

Prints one row per dataset and exits with status 1 when any dataset's mean PSNR, SSIM (or
CLIP cosine, with --clip) is below its threshold, so latent tasks can be refused for a VAE
that is too lossy on the data.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from data_pipelines import datasets, preprocess  # pylint: disable=wrong-import-position
from mediclip_jax.models import vae as V  # pylint: disable=wrong-import-position
from mediclip_jax.weights.io import CheckpointError  # pylint: disable=wrong-import-position


def load_support_images(root: str | os.PathLike, size: int, limit: int = 0) -> tuple[np.ndarray, list[str]]:
  """Normal training (support) images of a dataset as (N, size, size) in [0, 1] and their names,
  read as training reads them (data_pipelines: any layout it accepts, bilinear resize, then gray)."""
  samples = [s for s in datasets.load_dataset(root).train if s.label == 0]
  if limit:
    samples = samples[:limit]
  if not samples:
    raise ValueError(f"{root}: no normal training images")
  return np.stack([preprocess.load_train_image(s.path, size) for s in samples]), [s.name for s in samples]


def psnr(a: jax.Array, b: jax.Array) -> jax.Array:
  """Per-image PSNR in dB for (B, H, W) images in [0, 1]."""
  mse = jnp.mean(jnp.square(a - b), axis=(1, 2))
  return 10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-12))


def ssim(a: jax.Array, b: jax.Array, sigma: float = 1.5, radius: int = 5) -> jax.Array:
  """Per-image SSIM (Wang et al. 2004: 11×11 Gaussian window σ=1.5, K=(0.01, 0.03), range 1, valid region)."""
  x = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  g = jnp.exp(-0.5 * (x / sigma) ** 2)
  g = g / g.sum()

  def blur(v):
    v = jax.lax.conv_general_dilated(v[:, None], g[None, None, :, None], (1, 1), "VALID")
    return jax.lax.conv_general_dilated(v, g[None, None, None, :], (1, 1), "VALID")[:, 0]

  c1, c2 = 0.01 ** 2, 0.03 ** 2
  mu_a, mu_b = blur(a), blur(b)
  saa = blur(a * a) - mu_a ** 2
  sbb = blur(b * b) - mu_b ** 2
  sab = blur(a * b) - mu_a * mu_b
  m = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (saa + sbb + c2))
  return jnp.mean(m, axis=(1, 2))


def _batches(x: np.ndarray, batch: int):
  """Fixed-size batches (the last one padded by repetition) so one compiled program serves all."""
  for i in range(0, len(x), batch):
    chunk = x[i:i + batch]
    n = len(chunk)
    if n < batch:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
    yield chunk, n


def make_round_trip(vae):
  graphdef, state = nnx.split(vae)

  @jax.jit
  def rt(state, x):
    m = nnx.merge(graphdef, state)
    y = V.decode_gray(m, V.encode_gray(m, x))
    return y, psnr(y, x), ssim(y, x)
  return lambda x: rt(state, x)


def make_clip_cosine(path: str):
  """Cosine similarity of CLIP image embeddings of x and D(E(x)), via mediclip_jax.weights.clip_convert.load_clip."""
  from mediclip_jax.models.clip import clip_normalize  # pylint: disable=import-outside-toplevel
  from mediclip_jax.weights.clip_convert import load_clip  # pylint: disable=import-outside-toplevel
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


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--data", required=True, help="comma-separated MediCLIP-layout dataset roots")
  ap.add_argument("--vae_kind", default=V.KIND_TAEF2, choices=(V.KIND_TAEF2, V.KIND_KL))
  ap.add_argument("--vae_path", default=str(REPO.parent / "shared" / "weights" / "taef2"),
                  help="taef2: directory with taef2_{encoder,decoder}.pth; autoencoder_kl: diffusers dir or checkpoint file")
  ap.add_argument("--vae_dtype", default="float32")
  ap.add_argument("--size", type=int, default=256, help="images are resized to size×size")
  ap.add_argument("--num", type=int, default=0, help="first N support images (0 = all)")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--min_psnr", type=float, default=30.0, help="dB, on the mean over the support set")
  ap.add_argument("--min_ssim", type=float, default=0.85, help="on the mean over the support set")
  ap.add_argument("--clip", default=None, help="CLIP checkpoint (file or directory) for the feature cosine")
  ap.add_argument("--min_clip_cos", type=float, default=0.95, help="with --clip, on the mean")
  args = ap.parse_args(argv)

  cfg = V.default_config()
  cfg.kind, cfg.path, cfg.dtype = args.vae_kind, args.vae_path, args.vae_dtype
  if args.size % 8:
    print(f"--size {args.size}: must be a multiple of the VAE's downscale factor 8", file=sys.stderr)
    return 2
  try:
    vae = V.load_vae(cfg)
  except (CheckpointError, ValueError) as e:
    print(f"cannot load the VAE: {e}", file=sys.stderr)
    return 2
  rt = make_round_trip(vae)
  clip_cos = make_clip_cosine(args.clip) if args.clip else None

  header = f"{'dataset':<12} {'n':>3} {'PSNR mean':>9} {'PSNR min':>8} {'SSIM mean':>9} {'SSIM min':>8}"
  if clip_cos:
    header += f" {'CLIP cos':>8} {'cos min':>8}"
  print(f"VAE {args.vae_kind} ({args.vae_path}), {args.size}², thresholds: PSNR ≥ {args.min_psnr} dB, "
        f"SSIM ≥ {args.min_ssim}" + (f", CLIP cos ≥ {args.min_clip_cos}" if clip_cos else ""))
  print(header)
  failed = []
  for root in [r for r in args.data.split(",") if r]:
    images, _ = load_support_images(root, args.size, args.num)
    ps, ss, cs = [], [], []
    for chunk, n in _batches(images, args.batch):
      y, p, s = rt(jnp.asarray(chunk))
      ps.append(np.asarray(p)[:n])
      ss.append(np.asarray(s)[:n])
      if clip_cos:
        cs.append(np.asarray(clip_cos(jnp.asarray(chunk), y))[:n])
    ps, ss = np.concatenate(ps), np.concatenate(ss)
    name = Path(root).name
    row = f"{name:<12} {len(ps):>3} {ps.mean():>9.2f} {ps.min():>8.2f} {ss.mean():>9.4f} {ss.min():>8.4f}"
    bad = []
    if ps.mean() < args.min_psnr:
      bad.append("PSNR")
    if ss.mean() < args.min_ssim:
      bad.append("SSIM")
    if clip_cos:
      cs = np.concatenate(cs)
      row += f" {cs.mean():>8.4f} {cs.min():>8.4f}"
      if cs.mean() < args.min_clip_cos:
        bad.append("CLIP cos")
    print(row + ("  BELOW: " + ", ".join(bad) if bad else ""))
    if bad:
      failed.append(f"{name} ({', '.join(bad)})")
  if failed:
    print(f"FAIL: below threshold on {'; '.join(failed)}; latent tasks should not use this VAE", file=sys.stderr)
    return 1
  print("OK: the VAE passes the quality gate")
  return 0


if __name__ == "__main__":
  sys.exit(main())
