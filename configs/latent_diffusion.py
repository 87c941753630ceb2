"""Latent diffusion baseline: a DiT denoiser on frozen TAEF2 latents of normal images, scored by partial noising
to t* and DDIM back to a pseudo-healthy image. Defaults: 256 px, DiT-S/2, 500 epochs.

  python launch/train.py --config configs/latent_diffusion.py:phantom,tiny --workdir runs/ldm_phantom   # CPU, minutes
  python launch/train.py --config configs/latent_diffusion.py:oct_phantom,tiny --workdir runs/ldm_oct
  python launch/train.py --config configs/latent_diffusion.py:busi,tiny --workdir runs/ldm_busi_tiny
  python launch/train.py --config configs/latent_diffusion.py:dataset=brainmri --workdir runs/ldm_brainmri
  python launch/train.py --config configs/latent_diffusion.py:path=/data/my_set --workdir runs/ldm_mine
  python launch/train.py --config configs/latent_diffusion.py:busi,tiny,t_star=100;250;400,steps=20,draws=2 ...
  python launch/evaluate.py --workdir runs/ldm_busi_tiny --config.score.t_stars='(100,)'   # rescore a run

Arguments (comma separated): dataset=phantom|oct_phantom|busi|brainmri (a bare name works too), path=<dataset
folder>, shot=-1|k, tiny, t_star=<t>[;<t>...], steps=<DDIM steps>, draws=<noise draws>, noise=gaussian|perlin,
residual=pixel|latent|both, prediction=eps|v, vae_path=<TAEF2 folder> (see mediclip_jax/config_defaults.py:
latent_diffusion_config).
"""
from mediclip_jax.config_defaults import DIFFUSION_DATASETS, latent_diffusion_config


def get_config(arg=None):
  words = [w for w in (arg or "").split(",") if w]
  words = [f"dataset={w}" if w in DIFFUSION_DATASETS else w for w in words]
  return latent_diffusion_config(",".join(words))
