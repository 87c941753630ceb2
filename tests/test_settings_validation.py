"""Settings that cannot work are refused before anything is built, compiled or written, naming the field."""
from __future__ import annotations

import pytest

from configs import chestxray
from mediclip_jax import methods
from mediclip_jax.train import loop

CASES = [  # (field, value, message)
    ("train.batch_size", 0, "config.train.batch_size must be a positive integer"),
    ("train.batch_size", -4, "config.train.batch_size must be a positive integer"),
    ("train.epochs", 0, "config.train.epochs must be a positive integer"),
    ("train.epochs", -3, "config.train.epochs must be a positive integer"),
    ("train.log_every_steps", 0, "config.train.log_every_steps must be a positive integer"),
    ("train.checkpoint_every_steps", 0, "config.train.checkpoint_every_steps must be a positive integer"),
    ("train.max_to_keep", 0, "config.train.max_to_keep must be a positive integer"),
    ("eval.every_epochs", 0, "config.eval.every_epochs must be a positive integer"),
    ("eval.batch_size", 0, "config.eval.batch_size must be a positive integer"),
    ("data.image_size", 0, "config.data.image_size must be a positive integer"),
    ("eval.smoothing_sigma", -1.0, "config.eval.smoothing_sigma must be >= 0"),
    ("eval.threshold_quantile", 1.5, "config.eval.threshold_quantile must lie in"),
    ("eval.threshold_quantile", float("nan"), "config.eval.threshold_quantile must lie in"),
    ("eval.aupro_max_fpr", 0.0, "config.eval.aupro_max_fpr must lie in"),
    ("data.k_shot", 0, "config.data.k_shot must be -1"),
    ("train.lr", 0.0, "config.train.lr must be > 0"),
    ("train.lr", float("nan"), "config.train.lr must be > 0"),
    ("model.clip.dtype", "float16", "config.model.clip.dtype must be float32 or bfloat16"),
]


@pytest.mark.parametrize("field,value,message", CASES, ids=[f"{f}={v}" for f, v, _ in CASES])
def test_impossible_settings_are_refused_naming_the_field(field, value, message):
  c = chestxray.get_config("phantom,tiny")
  section, name = field.rsplit(".", 1)
  node = c
  for part in section.split("."):
    node = node[part]
  node[name] = value
  with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(".", r"\.")):
    loop.validate(c)
    methods.get(c.method).validate(c)
