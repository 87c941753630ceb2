"""SSL-AnoVAE: a self-supervised VAE trained on normal images only; the reconstruction residual scores,
stages (K-means) and segments anomalies. Defaults: 256 px, the networks of docs/ssl_anovae.md, 100 epochs.

  python launch/train.py --config configs/ssl_anovae.py:oct_phantom,tiny --workdir runs/ssl_oct   # CPU, minutes
  python launch/train.py --config configs/ssl_anovae.py:dataset=busi --workdir runs/ssl_busi
  python launch/train.py --config configs/ssl_anovae.py:dataset=brainmri,tiny --workdir runs/ssl_brainmri_tiny
  python launch/train.py --config configs/ssl_anovae.py:path=/data/my_set --workdir runs/ssl_mine
  python launch/train.py --config configs/ssl_anovae.py:oct_phantom,tiny,latents=image,adv=0 ...  # plain VAE

Arguments (comma separated): dataset=oct_phantom|busi|brainmri (a bare `oct_phantom`, `busi` or `brainmri`
works too), path=<dataset folder>, shot=-1|k, tiny, latents=both|image|ssl, ssl_mode=joint|pretrain_frozen,
adv=<lambda_4>, views=oct|fundus|grey|geometric|photometric|cutout|none (see mediclip_jax/config_defaults.py:
ssl_anovae_config).
"""
from mediclip_jax.config_defaults import SSL_DATASETS, ssl_anovae_config


def get_config(arg=None):
  words = [w for w in (arg or "").split(",") if w]
  words = [f"dataset={w}" if w in SSL_DATASETS else w for w in words]
  return ssl_anovae_config(",".join(words))
