"""MediCLIP on BrainMRI (MediCLIP layout; 32 train normals, 65 + 155 test, image AUROC).

Expects the dataset at ../shared/data/brainmri (override with --config.data.root=...).

  python launch/train.py --config configs/brainmri.py --config.model.clip.checkpoint=ckpt/vit_l14 \
      --workdir runs/brainmri
  python launch/train.py --config configs/brainmri.py:tiny,latent --workdir runs/brainmri_tiny  # CPU, TAEF2 latents

Arguments: preset=reference|improved, variant=ViT-L-14, shot=16, tiny, latent, vae_path=...
"""
from mediclip_jax.config_defaults import experiment_config


def get_config(arg=None):
  return experiment_config("../shared/data/brainmri", arg)
