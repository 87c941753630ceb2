"""MediCLIP on BUSI breast ultrasound (MediCLIP layout with lesion masks; image and pixel metrics).

Expects the dataset at ../shared/data/busi (override with --config.data.root=...). Model
selection as the reference: mean of image and pixel AUROC, reported beside the last epoch.

  python launch/train.py --config configs/busi.py --config.model.clip.checkpoint=ckpt/vit_l14 --workdir runs/busi
  python launch/train.py --config configs/busi.py:tiny,latent --workdir runs/busi_tiny  # CPU, TAEF2 latents

Arguments: preset=reference|improved, variant=ViT-L-14, shot=16, tiny, latent, vae_path=...
"""
from mediclip_jax.config_defaults import experiment_config


def get_config(arg=None):
  return experiment_config("../shared/data/busi", arg)
