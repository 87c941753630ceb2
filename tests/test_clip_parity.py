"""Parity of our CLIP towers with PyTorch implementations on identical tiny random weights.

transformers' `CLIPModel` builds and saves the weights (Hugging Face layout). The same tensors
rewritten in the OpenAI/open_clip layout (`visual.conv1.weight`, fused `in_proj_weight`, ...)
prove the second converter against the same PyTorch numbers. Where open_clip is importable
(it needs a working torchvision), its own `create_model` and position-embedding resize are
compared directly. An architecture that is none of the named variants loads through the
config path (`clip_from_config` with `variant=None`), its shape read from the checkpoint.
"""
from __future__ import annotations

import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from mediclip_jax.models.clip import CLIPConfig, clip_from_config, load_clip, save_clip  # noqa: E402
from mediclip_jax.weights import io  # noqa: E402
from mediclip_jax.weights.io import CheckpointError  # noqa: E402

TOL = 1e-4
TAPS = (1, 2, 3)


def _hf_model(act: str = "quick_gelu", vision_heads: int = 4, text_heads: int = 4, vw: int = 48, tw: int = 32,
              patch: int = 8, image: int = 32, mlp_ratio: int = 4, projection: int = 24):
  torch.manual_seed(0)
  cfg = transformers.CLIPConfig(
      text_config=dict(hidden_size=tw, intermediate_size=mlp_ratio * tw, num_attention_heads=text_heads,
                       num_hidden_layers=2, vocab_size=49408, max_position_embeddings=77, hidden_act=act),
      vision_config=dict(hidden_size=vw, intermediate_size=mlp_ratio * vw, num_attention_heads=vision_heads,
                         num_hidden_layers=3, image_size=image, patch_size=patch, hidden_act=act),
      projection_dim=projection)
  model = transformers.CLIPModel(cfg).eval()
  with torch.no_grad():  # non-trivial LayerNorm affine params, so a swapped scale/bias is caught
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def _token_ids(n: int = 3) -> np.ndarray:
  rng = np.random.default_rng(0)
  ids = np.zeros((n, 77), np.int64)
  for i, length in enumerate([5, 17, 77][:n]):
    ids[i, :length] = rng.integers(1, 49405, length)
    ids[i, 0], ids[i, length - 1] = 49406, 49407
  return ids


def _torch_reference(model, images: np.ndarray, ids: np.ndarray):
  with torch.no_grad():
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    vo = model.vision_model(pixel_values=x, output_hidden_states=True, interpolate_pos_encoding=True)
    img = model.visual_projection(vo.pooler_output).numpy()
    to = model.text_model(input_ids=torch.from_numpy(ids))
    txt = model.text_projection(to.pooler_output).numpy()
  return img, txt, [vo.hidden_states[i].numpy() for i in TAPS]


def _compare(ours, model, image_size: int) -> dict[str, float]:
  images = np.random.default_rng(1).normal(size=(2, image_size, image_size, 3)).astype(np.float32)
  ids = _token_ids()
  img_ref, txt_ref, taps_ref = _torch_reference(model, images, ids)
  out = ours.visual(jnp.asarray(images), tap_layers=TAPS)
  errs = {"image_embedding": float(np.abs(np.asarray(out.embedding) - img_ref).max()),
          "text_embedding": float(np.abs(np.asarray(ours.text(jnp.asarray(ids))) - txt_ref).max())}
  for layer, ours_tap, ref_tap in zip(TAPS, out.taps, taps_ref):
    assert ours_tap.shape == ref_tap.shape
    errs[f"tap_{layer}"] = float(np.abs(np.asarray(ours_tap) - ref_tap).max())
  print(f"parity @{image_size}px:", {k: f"{v:.2e}" for k, v in errs.items()})
  return errs


def _hf_to_openai(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The transformers CLIPModel state dict rewritten with OpenAI / open_clip key names."""
  out = {
      "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
      "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
      "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
      "visual.ln_pre.weight": sd["vision_model.pre_layrnorm.weight"],
      "visual.ln_pre.bias": sd["vision_model.pre_layrnorm.bias"],
      "visual.ln_post.weight": sd["vision_model.post_layernorm.weight"],
      "visual.ln_post.bias": sd["vision_model.post_layernorm.bias"],
      "visual.proj": sd["visual_projection.weight"].T.copy(),
      "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
      "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
      "ln_final.weight": sd["text_model.final_layer_norm.weight"],
      "ln_final.bias": sd["text_model.final_layer_norm.bias"],
      "text_projection": sd["text_projection.weight"].T.copy(),
      "logit_scale": sd["logit_scale"],
  }
  for tower, src_prefix, dst_prefix in (("v", "vision_model.encoder.layers.", "visual.transformer.resblocks."),
                                        ("t", "text_model.encoder.layers.", "transformer.resblocks.")):
    n = len({k.split(".")[3] for k in sd if k.startswith(src_prefix)})
    for i in range(n):
      s, d = f"{src_prefix}{i}.", f"{dst_prefix}{i}."
      out[d + "attn.in_proj_weight"] = np.concatenate([sd[s + f"self_attn.{q}_proj.weight"] for q in "qkv"])
      out[d + "attn.in_proj_bias"] = np.concatenate([sd[s + f"self_attn.{q}_proj.bias"] for q in "qkv"])
      out[d + "attn.out_proj.weight"] = sd[s + "self_attn.out_proj.weight"]
      out[d + "attn.out_proj.bias"] = sd[s + "self_attn.out_proj.bias"]
      for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
        out[d + a + ".weight"] = sd[s + b + ".weight"]
        out[d + a + ".bias"] = sd[s + b + ".bias"]
  return out


def _state_dict_np(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module", params=["quick_gelu", "gelu"])
def hf_dir(request, tmp_path_factory):
  model = _hf_model(act=request.param)
  path = tmp_path_factory.mktemp(f"hf_{request.param}")
  model.save_pretrained(path, safe_serialization=True)
  return model, path


@pytest.mark.parametrize("image_size", [32, 48])
def test_hf_directory_parity(hf_dir, image_size):
  model, path = hf_dir
  errs = _compare(load_clip(path), model, image_size)
  assert max(errs.values()) <= TOL, errs


def test_hf_pytorch_model_bin(tmp_path):
  model = _hf_model()
  # transformers >= 5 always writes safetensors; older releases wrote this pickled layout.
  model.save_pretrained(tmp_path)
  (tmp_path / "model.safetensors").unlink()
  torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
  assert (tmp_path / "pytorch_model.bin").is_file() and not (tmp_path / "model.safetensors").exists()
  errs = _compare(load_clip(tmp_path), model, 32)
  assert max(errs.values()) <= TOL, errs


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".bin"])
@pytest.mark.parametrize("image_size", [32, 48])
def test_openai_layout_parity(tmp_path, suffix, image_size):
  # Widths 128/64 with 2/1 heads keep OpenAI's head width of 64, so the architecture is inferred.
  model = _hf_model(vision_heads=2, text_heads=1, vw=128, tw=64)
  sd = _hf_to_openai(_state_dict_np(model))
  path = tmp_path / f"openai{suffix}"
  if suffix == ".safetensors":
    io.write_safetensors(path, sd)
  else:
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, path)
  ours = load_clip(path)
  assert ours.cfg.vision_heads == 2 and ours.cfg.text_heads == 1 and ours.cfg.act == "quick_gelu"
  errs = _compare(ours, model, image_size)
  assert max(errs.values()) <= TOL, errs


def test_openai_layout_explicit_config(tmp_path):
  """Head counts that are not width/64 need the architecture passed in; it is honoured."""
  model = _hf_model()
  path = tmp_path / "openai.safetensors"
  io.write_safetensors(path, _hf_to_openai(_state_dict_np(model)))
  cfg = CLIPConfig(embed_dim=24, image_size=32, patch_size=8, vision_width=48, vision_layers=3, vision_heads=4,
                   text_width=32, text_layers=2, text_heads=4)
  errs = _compare(load_clip(path, config=cfg), model, 32)
  assert max(errs.values()) <= TOL, errs


def _clip_section(checkpoint, variant=None) -> ml_collections.ConfigDict:
  """The fields of a config's `model.clip` section that clip_from_config reads."""
  return ml_collections.ConfigDict({"variant": variant, "checkpoint": str(checkpoint), "act": None,
                                    "dtype": "float32", "random_init_seed": 0})


@pytest.fixture(scope="module")
def unnamed_hf_dir(tmp_path_factory):
  """An architecture that is no named variant: patch 4 at 24 px, widths 48/32 in 4/2 heads, MLP ratio 2."""
  model = _hf_model(vision_heads=4, text_heads=2, vw=48, tw=32, patch=4, image=24, mlp_ratio=2, projection=24)
  path = tmp_path_factory.mktemp("hf_unnamed")
  model.save_pretrained(path, safe_serialization=True)
  return model, path


@pytest.mark.parametrize("image_size", [24, 32])
def test_unnamed_architecture_through_config(unnamed_hf_dir, image_size):
  model, path = unnamed_hf_dir
  ours = clip_from_config(_clip_section(path))
  assert ours.cfg == CLIPConfig(embed_dim=24, image_size=24, patch_size=4, vision_width=48, vision_layers=3,
                                vision_heads=4, text_width=32, text_layers=2, text_heads=2, mlp_ratio=2.0)
  errs = _compare(ours, model, image_size)
  assert max(errs.values()) <= TOL, errs


def test_wrong_variant_names_the_differing_fields(unnamed_hf_dir):
  _, path = unnamed_hf_dir
  with pytest.raises(CheckpointError) as e:
    clip_from_config(_clip_section(path, variant="tiny"))
  msg = str(e.value)
  assert msg.startswith(f"{path}: does not match model.clip.variant='tiny'"), msg
  for field in ("embed_dim: variant 32, checkpoint 24", "patch_size: variant 8, checkpoint 4",
                "vision_width: variant 64, checkpoint 48", "vision_layers: variant 4, checkpoint 3",
                "text_heads: variant 4, checkpoint 2", "mlp_ratio: variant 4.0, checkpoint 2.0"):
    assert field in msg, (field, msg)
  for same in ("text_width", "text_layers", "image_size", "context_length"):
    assert f"{same}:" not in msg, msg


def test_own_format_round_trip(hf_dir, tmp_path):
  model, path = hf_dir
  ours = load_clip(path)
  save_clip(ours, tmp_path / "own")
  again = load_clip(tmp_path / "own")
  assert again.cfg == ours.cfg
  errs = _compare(again, model, 32)
  assert max(errs.values()) <= TOL, errs


def test_bf16_compute_policy_keeps_fp32_params(hf_dir):
  model, path = hf_dir
  ours = load_clip(path, dtype=jnp.bfloat16)
  assert ours.visual.blocks[0].fc.kernel[...].dtype == jnp.float32
  images = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
  out = ours.visual(jnp.asarray(images), tap_layers=TAPS)
  assert out.embedding.dtype == jnp.bfloat16
  img_ref = _torch_reference(model, images, _token_ids())[0]
  # bf16 has an 8-bit mantissa: agreement to a few percent of the embedding scale.
  assert np.abs(np.asarray(out.embedding, np.float32) - img_ref).max() < 0.05 * np.abs(img_ref).max() + 0.05


def test_open_clip_create_model_parity(tmp_path):
  """open_clip's own model and resize; runs where open_clip (and a working torchvision) import."""
  open_clip = pytest.importorskip("open_clip", exc_type=ImportError)
  import json
  cfg = {"embed_dim": 24, "quick_gelu": True,
         "vision_cfg": {"image_size": 32, "layers": 3, "width": 128, "patch_size": 8, "head_width": 64},
         "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2}}
  (tmp_path / "TinyViT.json").write_text(json.dumps(cfg))
  open_clip.add_model_config(tmp_path / "TinyViT.json")
  torch.manual_seed(0)
  ref = open_clip.create_model("TinyViT", pretrained=None).eval()
  sd = _state_dict_np(ref)
  path = tmp_path / "open_clip.safetensors"
  io.write_safetensors(path, sd)
  ours = load_clip(path)
  ids = _token_ids()
  for size in (32, 48):
    model = ref
    if size != 32:
      model = open_clip.create_model("TinyViT", pretrained=None, force_image_size=size).eval()
      resized = {k: v.clone() for k, v in ref.state_dict().items()}
      open_clip.model.resize_pos_embed(resized, model)
      model.load_state_dict(resized)
    images = np.random.default_rng(1).normal(size=(2, size, size, 3)).astype(np.float32)
    taps = {}
    hooks = [model.visual.transformer.resblocks[i - 1].register_forward_hook(
        lambda m, a, o, i=i: taps.__setitem__(i, o)) for i in TAPS]
    with torch.no_grad():
      img_ref = model.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
      txt_ref = model.encode_text(torch.from_numpy(ids)).numpy()
    for h in hooks:
      h.remove()
    out = ours.visual(jnp.asarray(images), tap_layers=TAPS)
    assert np.abs(np.asarray(out.embedding) - img_ref).max() <= TOL
    assert np.abs(np.asarray(ours.text(jnp.asarray(ids))) - txt_ref).max() <= TOL
    for layer, tap in zip(TAPS, out.taps):
      ref_tap = taps[layer].numpy()
      if ref_tap.shape[0] != 2:  # sequence-first transformer
        ref_tap = ref_tap.transpose(1, 0, 2)
      assert np.abs(np.asarray(tap) - ref_tap).max() <= TOL
