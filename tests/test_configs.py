"""Configs load by path, pick CLIP variants by name, and the converter CLI writes a loadable checkpoint."""
from __future__ import annotations

import importlib.util

import pytest

from mediclip_jax.config_utils import parse_arg
from mediclip_jax.models.clip import VARIANTS, get_variant
from mediclip_jax.weights.clip_convert import clip_from_config, load_clip, save_clip
from mediclip_jax.weights.io import CheckpointError
from tests.conftest import REPO


def _load_config(name: str, arg: str | None = None):
  spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("variant,width,layers,patch,size,taps", [
    ("ViT-B-32", 768, 12, 32, 224, (6, 9, 12)), ("ViT-B-16", 768, 12, 16, 224, (6, 9, 12)),
    ("ViT-L-14", 1024, 24, 14, 224, (12, 18, 24)), ("ViT-L-14-336", 1024, 24, 14, 336, (12, 18, 24))])
def test_variants_selectable_by_name(variant, width, layers, patch, size, taps):
  c = _load_config("tiny", f"variant={variant}").model.clip
  arch = get_variant(c.variant)
  assert (arch.vision_width, arch.vision_layers, arch.patch_size, c.image_size) == (width, layers, patch, size)
  assert tuple(c.tap_layers) == taps
  assert get_variant(variant.replace("-", "/", 1)) == arch  # "ViT-L/14" spelling works too


def test_tiny_config_builds_a_model():
  c = _load_config("tiny").model.clip
  model = clip_from_config(c)
  assert model.cfg == VARIANTS["tiny"] and len(model.visual.blocks) == max(c.tap_layers)


def test_bad_config_arguments_are_named():
  with pytest.raises(ValueError, match="'shots' is not one of"):
    parse_arg("shots=4", shot=16)
  with pytest.raises(ValueError, match="shot='four': expected int"):
    parse_arg("shot=four", shot=16)
  with pytest.raises(ValueError, match="unknown CLIP variant 'ViT-H-14'"):
    _load_config("tiny", "variant=ViT-H-14")
  c = _load_config("tiny").model.clip
  c.dtype = "float16"
  with pytest.raises(ValueError, match="model.clip.dtype must be"):
    clip_from_config(c)


def test_checkpoint_must_match_variant(tmp_path):
  save_clip(clip_from_config(_load_config("tiny").model.clip), tmp_path / "tiny")
  c = _load_config("tiny", f"variant=ViT-B-16,checkpoint={tmp_path / 'tiny'}").model.clip
  with pytest.raises(CheckpointError, match="does not match model.clip.variant='ViT-B-16'"):
    clip_from_config(c)
  c = _load_config("tiny", f"checkpoint={tmp_path / 'tiny'}").model.clip
  assert clip_from_config(c).cfg == VARIANTS["tiny"]


def test_convert_weights_cli(tmp_path):
  transformers = pytest.importorskip("transformers")
  from launch.convert_weights import main
  from tests.test_clip_parity import _hf_model
  _hf_model().save_pretrained(tmp_path / "hf")
  assert main(["--src", str(tmp_path / "hf"), "--out", str(tmp_path / "own")]) == 0
  assert (tmp_path / "own" / "model.safetensors").is_file()
  assert load_clip(tmp_path / "own").cfg.vision_width == 48
  assert main(["--src", str(tmp_path / "hf"), "--out", str(tmp_path / "own")]) == 2  # refuses to overwrite
  assert main(["--src", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 1
  del transformers
