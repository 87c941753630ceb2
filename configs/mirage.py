"""MIRAGE: noise-robust image-text adaptation of the CLIP towers (stage 0), then few-shot MediCLIP on them.

  python launch/train.py --config configs/mirage.py:phantom_reports,tiny --workdir runs/mirage_phantom  # CPU, ~2 min
  python launch/train.py --config configs/mirage.py:phantom_reports,tiny,loss=infonce,fp_rate=0.4 ...
  python launch/train.py --config configs/mirage.py:busi_captions,tiny --workdir runs/mirage_busi
  python launch/train.py --config configs/mirage.py:brainmri_captions --config.model.clip.checkpoint=ckpt/vit_b16 ...
  python launch/train.py --config configs/mirage.py:pairs=/data/reports.jsonl,classes=normal;pneumonia ...
  # the chain: MediCLIP on the adapted towers
  python launch/train.py --config configs/chestxray.py:phantom,tiny --config.model.clip.checkpoint=runs/mirage_phantom/clip

Arguments (comma separated): a bare phantom_reports | busi_captions | brainmri_captions (or source=...),
pairs=<.jsonl/.csv> with classes=<names by label index, ';'-separated>, dataset_root=<captioned dataset folder>,
loss=mirage|infonce, fp_rate=<fraction of training captions replaced>, trainable=projections|last_blocks|full,
variant=<CLIP architecture at random init>, tiny (see mediclip_jax/config_defaults.py: mirage_config).
"""
from mediclip_jax.config_defaults import MIRAGE_SOURCES, mirage_config


def get_config(arg=None):
  words = [w for w in (arg or "").split(",") if w]
  words = [f"source={w}" if w in MIRAGE_SOURCES else w for w in words]
  return mirage_config(",".join(words))
