"""A user's first hour: the README's convert -> train commands, run as written on a tiny Hugging Face CLIP."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO


def _tiny_hf_clip():
  """A tiny transformers CLIPModel with 24 vision blocks, so the default taps (12, 18, 24) exist."""
  import torch
  import transformers
  torch.manual_seed(0)
  cfg = transformers.CLIPConfig(
      text_config=dict(hidden_size=32, intermediate_size=128, num_attention_heads=2, num_hidden_layers=2,
                       vocab_size=49408, max_position_embeddings=77),
      vision_config=dict(hidden_size=32, intermediate_size=128, num_attention_heads=2, num_hidden_layers=24,
                         image_size=32, patch_size=8),
      projection_dim=16)
  return transformers.CLIPModel(cfg).eval()


@pytest.mark.slow
def test_readme_convert_then_train_on_a_tiny_hf_checkpoint(tmp_path, shared_dir):
  """`convert_weights.py --src <hf> --out <ckpt>` then `train.py --config configs/busi.py
  --config.model.clip.checkpoint=<ckpt>` exit 0 with the default variant, and name the checkpoint as the weights."""
  pytest.importorskip("transformers")
  readme = (REPO / "README.md").read_text()
  convert = "python launch/convert_weights.py --src ~/models/clip-vit-large-patch14 --out ckpt/vit_l14"
  train = "python launch/train.py --config configs/busi.py --config.model.clip.checkpoint=ckpt/vit_l14 --workdir runs/busi"
  assert convert in readme and train in readme, "README's convert -> train commands changed; update this test"
  hf, ckpt, workdir = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "run"
  _tiny_hf_clip().save_pretrained(hf)

  argv_convert = convert.split()[1:]
  argv_convert[argv_convert.index("--src") + 1] = str(hf)
  argv_convert[argv_convert.index("--out") + 1] = str(ckpt)
  argv_train = [a.replace("ckpt/vit_l14", str(ckpt)).replace("runs/busi", str(workdir)) for a in train.split()[1:]]
  argv_train += ["--config.train.epochs=1", "--config.data.image_size=64", "--config.eval.every_epochs=1",
                 "--config.data.k_shot=8"]
  if shared_dir != REPO.parent / "shared":  # the config's default data root is ../shared/data/busi
    argv_train.append(f"--config.data.root={shared_dir / 'data' / 'busi'}")

  t0 = time.perf_counter()
  conv = subprocess.run([sys.executable, *argv_convert], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert conv.returncode == 0, conv.stderr[-3000:]
  t1 = time.perf_counter()
  run = subprocess.run([sys.executable, *argv_train], cwd=REPO, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
  print(f"\nconvert {t1 - t0:.1f} s, train {time.perf_counter() - t1:.1f} s")
  assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
  console = run.stdout + run.stderr
  assert f"weights: {ckpt}" in console, console[-3000:]
  assert "randomly initialised" not in console
  results = json.loads((workdir / "results.json").read_text())
  assert results["backbone"]["weights"] == str(ckpt)
  assert results["backbone"]["architecture"]["vision_layers"] == 24
