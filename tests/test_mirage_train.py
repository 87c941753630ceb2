"""MIRAGE through the generic loop and the launcher on generated phantom image-report pairs: a run that
adapts a tiny random CLIP, evaluates (untrained row included), checkpoints and writes a CLIP checkpoint that
MediCLIP loads; SIGTERM then resume to the same parameters; the config's validation.

Launchers run as subprocesses (their absl flags collide in one process) sharing the session's compilation cache.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO
from tests.processes import (launcher_env, read_params, resume_to_the_uninterrupted_run, run_to_completion,
                             sigterm_after_first_train_row)

CONFIG = ["--config", f"{REPO / 'configs' / 'mirage.py'}:phantom_reports,tiny,fp_rate=0.4"]
# 240 pairs at 64 px: 192 train / 24 val / 24 test; batch 16: 12 steps per epoch, 24 steps; evaluations at
# steps 0, 12, 24; checkpoints only at the end (an earlier one can only come from SIGTERM).
OVERRIDES = ["--config.data.pairs.n=240", "--config.train.batch_size=16", "--config.train.epochs=2",
             "--config.eval.every_epochs=1", "--config.train.checkpoint_every_steps=24",
             "--config.train.log_every_steps=2", "--config.mirage.bank_size=64"]
STEPS = 24
RESULT_KEYS = ("zeroshot_auroc", "zeroshot_accuracy", "i2t_recall@1", "i2t_recall@5", "i2t_recall@10",
               "t2i_recall@1", "val_mean_recall@1", "noise_auroc", "s_noisy_mean", "s_clean_mean")
TRAIN_KEYS = ("loss", "pcl", "rcl", "otc", "s_mean", "s_noisy", "s_clean", "fn_pair_fraction", "tau_pcl",
              "tau_queue", "grad_norm")


def _train_cmd(workdir: Path, *extra: str) -> list[str]:
  return [sys.executable, str(REPO / "launch" / "train.py"), *CONFIG, "--workdir", str(workdir), *OVERRIDES,
          "--dump_params", *extra]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
  wd = tmp_path_factory.mktemp("mirage") / "a"
  return run_to_completion(_train_cmd(wd), wd, launcher_env())


@pytest.mark.slow
def test_run_adapts_evaluates_checkpoints_and_writes_a_clip_checkpoint(uninterrupted):
  results = json.loads((uninterrupted / "results.json").read_text())
  assert results["steps"] == STEPS
  for row in ("untrained", "last_epoch"):
    for k in RESULT_KEYS:
      assert results[row][k] is not None and np.isfinite(results[row][k]), (row, k)
  assert results["untrained"] != results["last_epoch"]
  assert "decision" not in results  # no anomaly threshold: MIRAGE is not a detector
  rows = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in rows if "train/loss" in r]
  assert len(train) == STEPS // 2 and all(f"train/{k}" in train[-1] for k in TRAIN_KEYS)
  evals = [r["step"] for r in rows if "eval/zeroshot_auroc" in r]
  assert evals == [0, 12, 24]
  assert sorted(p.name for p in (uninterrupted / "checkpoints").iterdir() if p.name.isdigit()) == ["24"]
  console = (uninterrupted / "console.txt").read_text()
  assert "77 training captions replaced" in console and "WARNING: the CLIP towers start from random init" in console

  # The chain: the adapted towers load as a CLIP checkpoint with the training config in their metadata.
  from mediclip_jax.models.clip import load_clip
  from mediclip_jax.weights import io
  ckpt = Path(results["outputs"]["clip_checkpoint"])
  assert ckpt == uninterrupted / "clip"
  _, meta = io.read_safetensors(ckpt / "model.safetensors")
  assert meta["method"] == "mirage" and meta["step"] == str(STEPS)
  assert json.loads(meta["training_config"])["data"]["pairs"]["fp_rate"] == 0.4
  model = load_clip(ckpt)
  trained = read_params(uninterrupted)
  got = np.asarray(model.visual.proj[...])
  np.testing.assert_array_equal(got, trained["clip.visual.proj"])
  tau = 1 / np.exp(float(model.logit_scale[...]))
  assert tau == pytest.approx(results["last_epoch"].get("tau_pcl", tau))


@pytest.mark.slow
def test_sigterm_then_resume_ends_with_the_uninterrupted_parameters_and_metrics(uninterrupted, tmp_path):
  wd = tmp_path / "b"
  step = sigterm_after_first_train_row(_train_cmd(wd), wd, launcher_env())
  assert 2 <= step < STEPS
  assert not (wd / "clip").exists()  # the CLIP checkpoint is written when the run completes
  resume_to_the_uninterrupted_run(_train_cmd(wd), wd, step, uninterrupted, launcher_env(), metric_tol=1e-5)
  assert (wd / "clip" / "model.safetensors").is_file()


def _config(arg: str = "phantom_reports,tiny"):
  sys.path.insert(0, str(REPO))
  from configs import mirage as mirage_config
  return mirage_config.get_config(arg)


@pytest.mark.parametrize("field,value,message", [
    ("mirage.loss", "clip", "config.mirage.loss must be one of"),
    ("mirage.trainable", "adapters", "config.mirage.trainable must be one of"),
    ("mirage.ot_cost", "transposed", "config.mirage.ot_cost must be one of"),
    ("mirage.bank_size", 8, "config.mirage.bank_size (8) must be at least the global batch"),
    ("mirage.temperatures.rcl", 0.0, "config.mirage.temperatures.rcl must be > 0"),
    ("data.pairs.fp_rate", 1.0, "config.data.pairs.fp_rate must lie in [0, 1)"),
    ("data.pairs.source", "reports.txt", "config.data.pairs.source must be one of"),
    ("data.pairs.split", (0.5, 0.5, 0.0), "config.data.pairs.split must be three positive fractions"),
])
def test_validate_names_the_field(field, value, message):
  from mediclip_jax.methods import mirage
  c = _config()
  *parents, leaf = field.split(".")
  node = c
  for p in parents:
    node = node[p]
  with c.unlocked():
    node[leaf] = value
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
    mirage.validate(c)


def test_config_arguments():
  c = _config("busi_captions,loss=infonce,fp_rate=0.2")
  assert c.data.pairs.source == "busi_captions" and c.data.pairs.dataset_root == "../shared/data/busi"
  assert c.mirage.loss == "infonce" and c.data.pairs.fp_rate == 0.2 and c.model.clip.variant == "ViT-B-16"
  c = _config("pairs=/data/r.jsonl,classes=normal;pneumonia")
  assert c.data.pairs.source == "/data/r.jsonl" and tuple(c.data.pairs.classes) == ("normal", "pneumonia")
  with pytest.raises(ValueError, match="source='mri' is not one of"):
    _config("source=mri")


def test_trainable_scopes_select_the_named_parameters():
  import ml_collections
  from flax import nnx
  from mediclip_jax.methods import mirage
  from mediclip_jax.models.clip import create_clip, get_variant
  clip = create_clip(get_variant("tiny"))  # 4 vision blocks, 2 text blocks

  def chosen(scope, blocks=1):
    m = ml_collections.ConfigDict({"trainable": scope, "train_blocks": blocks})
    _, params, _ = nnx.split(clip, mirage.trainable_filter(m, 4, 2), ...)
    return {".".join(map(str, p)) for p, _ in nnx.to_flat_state(params)}

  assert chosen("projections") == {"visual.proj", "text.proj"}
  last = chosen("last_blocks")
  assert {"visual.proj", "text.proj", "visual.ln_post.scale", "text.ln_final.bias"} <= last
  assert any(n.startswith("visual.blocks.3.") for n in last) and not any(n.startswith("visual.blocks.2.") for n in last)
  assert any(n.startswith("text.blocks.1.") for n in last) and not any(n.startswith("text.blocks.0.") for n in last)
  full = chosen("full")
  assert "logit_scale" not in full and "visual.patch_embed" in full and "text.token_embedding" in full
  assert len(full) == len({".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(clip, nnx.Param))}) - 1
