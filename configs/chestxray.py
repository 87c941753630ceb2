"""MediCLIP on chest radiographs (CheXpert in the MediCLIP layout), ViT-L/14 @ 224 as the reference.

Expects `data/chexpert` (override with --config.data.root=...) in the MediCLIP layout
(`images/...` + `samples/{train,test}.json`) or the plain folder layout (`train/normal`,
`test/normal`, `test/abnormal`). CheXpert is not distributed with the project (research licence).

  python launch/train.py --config configs/chestxray.py --config.data.root=/data/chexpert \
      --config.model.clip.checkpoint=ckpt/vit_l14 --workdir runs/chexpert
  python launch/train.py --config configs/chestxray.py:phantom,tiny --workdir runs/phantom  # embedded data, CPU

Arguments (comma separated): preset=reference|improved, variant=ViT-L-14, shot=16, phantom, tiny,
latent, vae_path=...  (see mediclip_jax/config_defaults.py: experiment_config).
"""
from mediclip_jax.config_defaults import experiment_config


def get_config(arg=None):
  return experiment_config("data/chexpert", arg)
