"""Broken or foreign checkpoints fail with errors that name the problem."""
from __future__ import annotations

import builtins
import json
import struct

import numpy as np
import pytest

from mediclip_jax.models.clip import create_clip, get_variant, load_clip, save_clip
from mediclip_jax.weights import io
from mediclip_jax.weights.io import CheckpointError


@pytest.fixture(scope="module")
def own_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("own")
  save_clip(create_clip(get_variant("tiny")), path)
  return path


def _rewrite(src_dir, dst_dir, edit):
  tensors, meta = io.read_safetensors(src_dir / "model.safetensors")
  edit(tensors)
  dst_dir.mkdir()
  io.write_safetensors(dst_dir / "model.safetensors", tensors, meta)
  (dst_dir / "clip_config.json").write_text((src_dir / "clip_config.json").read_text())
  return dst_dir


def test_missing_tensor_is_named(own_dir, tmp_path):
  bad = _rewrite(own_dir, tmp_path / "bad", lambda t: t.pop("visual.blocks.2.attn.qkv.bias"))
  with pytest.raises(CheckpointError, match=r"missing tensors \(1\): visual\.blocks\.2\.attn\.qkv\.bias"):
    load_clip(bad)


def test_wrong_shape_is_named(own_dir, tmp_path):
  def edit(t):
    t["text.proj"] = np.zeros((32, 31), np.float32)
  bad = _rewrite(own_dir, tmp_path / "bad", edit)
  with pytest.raises(CheckpointError, match=r"text\.proj: checkpoint \(32, 31\), model expects \(32, 32\)"):
    load_clip(bad)


def test_unexpected_tensor_is_named(own_dir, tmp_path):
  def edit(t):
    t["visual.extra_head.kernel"] = np.zeros((2,), np.float32)
  bad = _rewrite(own_dir, tmp_path / "bad", edit)
  with pytest.raises(CheckpointError, match=r"unexpected tensors \(1\): visual\.extra_head\.kernel"):
    load_clip(bad)


def test_unknown_file_type(tmp_path):
  path = tmp_path / "weights.onnx"
  path.write_bytes(b"\0" * 16)
  with pytest.raises(CheckpointError, match=r"weights\.onnx: unknown checkpoint file type; expected one of \.safetensors"):
    load_clip(path)


def test_missing_path(tmp_path):
  with pytest.raises(CheckpointError, match="no such CLIP checkpoint"):
    load_clip(tmp_path / "nope.safetensors")


def test_directory_without_known_files(tmp_path):
  with pytest.raises(CheckpointError, match="neither clip_config.json .* nor config.json"):
    load_clip(tmp_path)


def test_corrupt_safetensors_header(tmp_path):
  path = tmp_path / "x.safetensors"
  path.write_bytes(struct.pack("<Q", 10_000) + b"{}")
  with pytest.raises(CheckpointError, match="header length 10000 exceeds the file size"):
    io.read_safetensors(path)
  path.write_bytes(struct.pack("<Q", 4) + b"nope")
  with pytest.raises(CheckpointError, match="unreadable safetensors header"):
    io.read_safetensors(path)


def test_foreign_key_layout_is_reported(tmp_path):
  path = tmp_path / "resnet.safetensors"
  io.write_safetensors(path, {"conv1.weight": np.zeros((4, 3, 3, 3), np.float32)})
  with pytest.raises(CheckpointError, match="unrecognised CLIP key layout"):
    load_clip(path)


def test_openai_layout_missing_block_tensor(own_dir, tmp_path):
  torch = pytest.importorskip("torch")
  from tests.test_clip_parity import _hf_model, _hf_to_openai, _state_dict_np
  sd = _hf_to_openai(_state_dict_np(_hf_model(vision_heads=2, text_heads=1, vw=128, tw=64)))
  del sd["transformer.resblocks.1.mlp.c_proj.bias"]
  path = tmp_path / "openai.pt"
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, path)
  with pytest.raises(CheckpointError, match=r"missing tensors \['transformer\.resblocks\.1\.mlp\.c_proj\.bias'\]"):
    load_clip(path)


def test_openai_layout_head_count_not_inferable(tmp_path):
  """A 48-wide tower has no 64-wide heads: the error says so and how to pass the architecture."""
  pytest.importorskip("torch")
  from tests.test_clip_parity import _hf_model, _hf_to_openai, _state_dict_np
  path = tmp_path / "openai.safetensors"
  io.write_safetensors(path, _hf_to_openai(_state_dict_np(_hf_model())))
  with pytest.raises(CheckpointError, match=r"vision width 48 is not a multiple of 64.*config="):
    load_clip(path)


def test_hf_config_missing_field(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"vision_config": {}, "text_config": {}}))
  with pytest.raises(CheckpointError, match="config.json lacks field"):
    load_clip(tmp_path)


def test_pickle_needs_torch_with_clear_message(tmp_path, monkeypatch):
  path = tmp_path / "weights.pt"
  path.write_bytes(b"not really a pickle")
  real_import = builtins.__import__

  def no_torch(name, *args, **kwargs):
    if name == "torch":
      raise ImportError("No module named 'torch'")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_torch)
  with pytest.raises(CheckpointError, match=r"needs torch \(pip install torch==2\.13\.0\)"):
    io.read_tensors(path)


def test_pickle_with_arbitrary_objects_is_refused(tmp_path):
  torch = pytest.importorskip("torch")
  path = tmp_path / "evil.pt"
  torch.save({"w": torch.zeros(2), "obj": ValueError("arbitrary object")}, path)
  with pytest.raises(CheckpointError, match=r"weights_only=True\) failed"):
    io.read_tensors(path)


def test_torchscript_archive_is_read_without_unpickling(tmp_path):
  torch = pytest.importorskip("torch")
  path = tmp_path / "scripted.pt"
  torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))
  # The archive is opened (through torch.jit.load) and its tensors reach the layout check.
  with pytest.raises(CheckpointError, match=r"unrecognised CLIP key layout.*\['bias', 'weight'\]"):
    load_clip(path)


def test_a_failed_start_removes_only_what_it_created_and_only_without_a_checkpoint(tmp_path):
  from mediclip_jax.train import workdir as workdir_lib
  wd = tmp_path / "run"
  wd.mkdir()
  (wd / "notes.txt").write_text("mine")
  guard = workdir_lib.FailedStartCleanup(str(wd))
  (wd / "config.json").write_text("{}")
  (wd / "support_set.json").write_text("{}")
  (wd / "checkpoints" / "3.orbax-checkpoint-tmp-1").mkdir(parents=True)  # a save that never finished
  guard.remove_unless_checkpointed()
  assert sorted(p.name for p in wd.iterdir()) == ["notes.txt"]
  guard = workdir_lib.FailedStartCleanup(str(wd))
  (wd / "config.json").write_text("{}")
  (wd / "checkpoints" / "3").mkdir(parents=True)  # a finished checkpoint: the run exists, keep everything
  guard.remove_unless_checkpointed()
  assert sorted(p.name for p in wd.iterdir()) == ["checkpoints", "config.json", "notes.txt"]
  fresh = tmp_path / "fresh"
  guard = workdir_lib.FailedStartCleanup(str(fresh))
  (fresh / "config.json").write_text("{}")
  guard.remove_unless_checkpointed()
  assert not fresh.exists()


def test_weights_with_nan_or_infinity_are_refused_naming_the_tensors():
  check_finite = io.check_finite
  check_finite({"a": np.ones(3, np.float32), "step": np.arange(3)}, "ok.safetensors")
  bad = {"a": np.ones(3, np.float32), "visual.proj": np.array([1.0, np.nan]), "b": np.array([np.inf], np.float16)}
  with pytest.raises(CheckpointError, match=r"w\.bin: 2 tensors hold NaN or infinite values \(b, visual\.proj\)"):
    check_finite(bad, "w.bin")
