"""Load CLIP weights from the formats users have, without network access.

Accepted sources:
  * our own checkpoint: a directory with `clip_config.json` + `model.safetensors`
    (written by `save_clip` / `launch/convert_weights.py`);
  * a Hugging Face CLIP directory: `config.json` + `model.safetensors` or `pytorch_model.bin`;
  * an OpenAI / open_clip state dict: `.safetensors`, `.pt`, `.pth`, `.bin` (pickles through
    `torch.load(weights_only=True)`; OpenAI's original TorchScript `.pt` archives through
    `torch.jit.load`, which runs no Python unpickling).
Key layouts are recognised from the tensor names, so a `.safetensors` file in either the
Hugging Face or the OpenAI layout loads.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from mediclip_jax.models.clip import CLIP, CLIPConfig, create_clip
from mediclip_jax.weights import io
from mediclip_jax.weights.io import CheckpointError
from mediclip_jax.weights.params import assign_flat_params, flat_params

OWN_CONFIG = "clip_config.json"
OWN_WEIGHTS = "model.safetensors"
# Buffers some exporters keep in the state dict; they carry no learned values.
_IGNORED = ("input_resolution", "context_length", "vocab_size", "attn_mask",
            "vision_model.embeddings.position_ids", "text_model.embeddings.position_ids")


def _t(a: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(a).T)


def _count_blocks(keys, prefix: str) -> int:
  pat = re.compile(re.escape(prefix) + r"(\d+)\.")
  found = {int(m.group(1)) for k in keys if (m := pat.match(k))}
  if not found:
    return 0
  if found != set(range(max(found) + 1)):
    raise CheckpointError(f"non-contiguous block indices under {prefix!r}: {sorted(found)}")
  return max(found) + 1


def detect_layout(tensors: Mapping[str, np.ndarray]) -> str:
  """'hf' (transformers CLIPModel), 'openai' (OpenAI / open_clip) or 'own'."""
  keys = set(tensors)
  if any(k.startswith("vision_model.") for k in keys):
    return "hf"
  if "visual.conv1.weight" in keys:
    return "openai"
  if "visual.patch_embed" in keys:
    return "own"
  raise CheckpointError(
      "unrecognised CLIP key layout: expected transformers names ('vision_model.*'), "
      "OpenAI/open_clip names ('visual.conv1.weight', ...) or mediclip_jax names; "
      f"first keys: {sorted(keys)[:8]}")


# ---------------------------------------------------------------- OpenAI / open_clip


def config_from_openai(sd: Mapping[str, np.ndarray], act: str = "quick_gelu") -> CLIPConfig:
  """Infers the architecture as OpenAI's builder does (head width 64 in both towers)."""
  try:
    vw = sd["visual.conv1.weight"].shape[0]
    patch = sd["visual.conv1.weight"].shape[-1]
    grid = math.isqrt(sd["visual.positional_embedding"].shape[0] - 1)
    tw = sd["ln_final.weight"].shape[0]
    return CLIPConfig(
        embed_dim=sd["text_projection"].shape[1], image_size=patch * grid, patch_size=patch,
        vision_width=vw, vision_layers=_count_blocks(sd, "visual.transformer.resblocks."),
        vision_heads=vw // 64, text_width=tw, text_layers=_count_blocks(sd, "transformer.resblocks."),
        text_heads=tw // 64, context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0],
        mlp_ratio=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / vw, act=act)
  except KeyError as e:
    raise CheckpointError(f"OpenAI/open_clip state dict lacks {e.args[0]!r}, needed to infer the architecture") from e


# Per residual block: (our name, source names concatenated along axis 0, transpose to (in, out)).
BlockTable = tuple[tuple[str, tuple[str, ...], bool], ...]

_OPENAI_BLOCK: BlockTable = (
    ("ln_1.scale", ("ln_1.weight",), False), ("ln_1.bias", ("ln_1.bias",), False),
    ("attn.qkv.kernel", ("attn.in_proj_weight",), True), ("attn.qkv.bias", ("attn.in_proj_bias",), False),
    ("attn.out.kernel", ("attn.out_proj.weight",), True), ("attn.out.bias", ("attn.out_proj.bias",), False),
    ("ln_2.scale", ("ln_2.weight",), False), ("ln_2.bias", ("ln_2.bias",), False),
    ("fc.kernel", ("mlp.c_fc.weight",), True), ("fc.bias", ("mlp.c_fc.bias",), False),
    ("proj.kernel", ("mlp.c_proj.weight",), True), ("proj.bias", ("mlp.c_proj.bias",), False),
)


def _block_keys(table: BlockTable, prefix: str, n: int) -> set[str]:
  """Every source tensor name `table` reads for blocks 0..n-1 under `prefix` (e.g. 'transformer.resblocks.')."""
  return {f"{prefix}{i}.{k}" for i in range(n) for _, srcs, _ in table for k in srcs}


def _convert_blocks(sd, table: BlockTable, src_prefix: str, dst_prefix: str, n: int, out: dict) -> None:
  for i in range(n):
    for dst, srcs, transpose in table:
      a = np.concatenate([sd[f"{src_prefix}{i}.{k}"] for k in srcs], axis=0) if len(srcs) > 1 \
          else sd[f"{src_prefix}{i}.{srcs[0]}"]
      out[f"{dst_prefix}{i}.{dst}"] = _t(a) if transpose else a


def _used_openai_keys(cfg: CLIPConfig) -> set[str]:
  keys = {"visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding",
          "visual.ln_pre.weight", "visual.ln_pre.bias", "visual.ln_post.weight", "visual.ln_post.bias",
          "visual.proj", "token_embedding.weight", "positional_embedding", "ln_final.weight",
          "ln_final.bias", "text_projection", "logit_scale"}
  keys |= _block_keys(_OPENAI_BLOCK, "visual.transformer.resblocks.", cfg.vision_layers)
  keys |= _block_keys(_OPENAI_BLOCK, "transformer.resblocks.", cfg.text_layers)
  return keys


def from_openai(sd: Mapping[str, np.ndarray], cfg: CLIPConfig, source: str) -> dict[str, np.ndarray]:
  """OpenAI / open_clip state dict -> our flat parameter names."""
  used = _used_openai_keys(cfg)
  missing = sorted(used - set(sd))
  extra = sorted(k for k in sd if k not in used and not k.endswith(_IGNORED))
  if missing or extra:
    raise CheckpointError(f"{source}: OpenAI/open_clip layout: "
                          + (f"missing tensors {missing[:20]} " if missing else "")
                          + (f"unexpected tensors {extra[:20]}" if extra else ""))
  out = {
      "visual.patch_embed": np.transpose(sd["visual.conv1.weight"], (2, 3, 1, 0)),
      "visual.class_embedding": sd["visual.class_embedding"],
      "visual.pos_embed": sd["visual.positional_embedding"],
      "visual.ln_pre.scale": sd["visual.ln_pre.weight"], "visual.ln_pre.bias": sd["visual.ln_pre.bias"],
      "visual.ln_post.scale": sd["visual.ln_post.weight"], "visual.ln_post.bias": sd["visual.ln_post.bias"],
      "visual.proj": sd["visual.proj"],
      "text.token_embedding": sd["token_embedding.weight"],
      "text.pos_embed": sd["positional_embedding"],
      "text.ln_final.scale": sd["ln_final.weight"], "text.ln_final.bias": sd["ln_final.bias"],
      "text.proj": sd["text_projection"],
      "logit_scale": np.asarray(sd["logit_scale"]).reshape(()),
  }
  _convert_blocks(sd, _OPENAI_BLOCK, "visual.transformer.resblocks.", "visual.blocks.", cfg.vision_layers, out)
  _convert_blocks(sd, _OPENAI_BLOCK, "transformer.resblocks.", "text.blocks.", cfg.text_layers, out)
  return out


# ---------------------------------------------------------------- Hugging Face transformers


def config_from_hf(hf: Mapping) -> CLIPConfig:
  """CLIPConfig from a transformers `config.json` dict of a CLIPModel."""
  try:
    v, t = hf["vision_config"], hf["text_config"]
    acts = {v.get("hidden_act", "quick_gelu"), t.get("hidden_act", "quick_gelu")}
    if len(acts) != 1 or not acts <= {"quick_gelu", "gelu"}:
      raise CheckpointError(f"config.json: hidden_act {sorted(acts)} unsupported; expected one of quick_gelu, gelu")
    ratios = {v["intermediate_size"] / v["hidden_size"], t["intermediate_size"] / t["hidden_size"]}
    if len(ratios) != 1:
      raise CheckpointError(f"config.json: vision and text MLP ratios differ ({sorted(ratios)}); unsupported")
    eps = {v.get("layer_norm_eps", 1e-5), t.get("layer_norm_eps", 1e-5)}
    return CLIPConfig(
        embed_dim=hf.get("projection_dim", 512), image_size=v["image_size"], patch_size=v["patch_size"],
        vision_width=v["hidden_size"], vision_layers=v["num_hidden_layers"], vision_heads=v["num_attention_heads"],
        text_width=t["hidden_size"], text_layers=t["num_hidden_layers"], text_heads=t["num_attention_heads"],
        context_length=t.get("max_position_embeddings", 77), vocab_size=t.get("vocab_size", 49408),
        mlp_ratio=ratios.pop(), act=acts.pop(), ln_eps=eps.pop() if len(eps) == 1 else 1e-5)
  except KeyError as e:
    raise CheckpointError(f"config.json lacks field {e.args[0]!r} of a transformers CLIPModel config") from e


_HF_BLOCK: BlockTable = (
    ("ln_1.scale", ("layer_norm1.weight",), False), ("ln_1.bias", ("layer_norm1.bias",), False),
    ("attn.qkv.kernel", tuple(f"self_attn.{n}_proj.weight" for n in "qkv"), True),
    ("attn.qkv.bias", tuple(f"self_attn.{n}_proj.bias" for n in "qkv"), False),
    ("attn.out.kernel", ("self_attn.out_proj.weight",), True), ("attn.out.bias", ("self_attn.out_proj.bias",), False),
    ("ln_2.scale", ("layer_norm2.weight",), False), ("ln_2.bias", ("layer_norm2.bias",), False),
    ("fc.kernel", ("mlp.fc1.weight",), True), ("fc.bias", ("mlp.fc1.bias",), False),
    ("proj.kernel", ("mlp.fc2.weight",), True), ("proj.bias", ("mlp.fc2.bias",), False),
)


def from_hf(sd: Mapping[str, np.ndarray], cfg: CLIPConfig, source: str) -> dict[str, np.ndarray]:
  """transformers CLIPModel state dict -> our flat parameter names."""
  v, t = "vision_model.", "text_model."
  used = {f"{v}embeddings.class_embedding", f"{v}embeddings.patch_embedding.weight",
          f"{v}embeddings.position_embedding.weight", f"{v}pre_layrnorm.weight", f"{v}pre_layrnorm.bias",
          f"{v}post_layernorm.weight", f"{v}post_layernorm.bias", "visual_projection.weight",
          f"{t}embeddings.token_embedding.weight", f"{t}embeddings.position_embedding.weight",
          f"{t}final_layer_norm.weight", f"{t}final_layer_norm.bias", "text_projection.weight", "logit_scale"}
  used |= _block_keys(_HF_BLOCK, f"{v}encoder.layers.", cfg.vision_layers)
  used |= _block_keys(_HF_BLOCK, f"{t}encoder.layers.", cfg.text_layers)
  missing = sorted(used - set(sd))
  extra = sorted(k for k in sd if k not in used and not k.endswith(_IGNORED))
  if missing or extra:
    raise CheckpointError(f"{source}: transformers CLIP layout: "
                          + (f"missing tensors {missing[:20]} " if missing else "")
                          + (f"unexpected tensors {extra[:20]}" if extra else ""))
  out = {
      "visual.patch_embed": np.transpose(sd[f"{v}embeddings.patch_embedding.weight"], (2, 3, 1, 0)),
      "visual.class_embedding": sd[f"{v}embeddings.class_embedding"],
      "visual.pos_embed": sd[f"{v}embeddings.position_embedding.weight"],
      "visual.ln_pre.scale": sd[f"{v}pre_layrnorm.weight"], "visual.ln_pre.bias": sd[f"{v}pre_layrnorm.bias"],
      "visual.ln_post.scale": sd[f"{v}post_layernorm.weight"], "visual.ln_post.bias": sd[f"{v}post_layernorm.bias"],
      "visual.proj": _t(sd["visual_projection.weight"]),
      "text.token_embedding": sd[f"{t}embeddings.token_embedding.weight"],
      "text.pos_embed": sd[f"{t}embeddings.position_embedding.weight"],
      "text.ln_final.scale": sd[f"{t}final_layer_norm.weight"], "text.ln_final.bias": sd[f"{t}final_layer_norm.bias"],
      "text.proj": _t(sd["text_projection.weight"]),
      "logit_scale": np.asarray(sd["logit_scale"]).reshape(()),
  }
  _convert_blocks(sd, _HF_BLOCK, f"{v}encoder.layers.", "visual.blocks.", cfg.vision_layers, out)
  _convert_blocks(sd, _HF_BLOCK, f"{t}encoder.layers.", "text.blocks.", cfg.text_layers, out)
  return out


# ---------------------------------------------------------------- entry points


def _read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a single-file state dict; OpenAI TorchScript archives go through torch.jit.load."""
  try:
    sd = io.read_tensors(path)
  except CheckpointError as e:
    if "TorchScript" not in str(e):
      raise
    import torch  # pylint: disable=import-outside-toplevel
    module = torch.jit.load(path, map_location="cpu")
    sd = {k: v.float().numpy() for k, v in module.state_dict().items()}
  return io.strip_prefix(sd, ("module.", "state_dict.", "model."))


def read_clip_checkpoint(path: str | os.PathLike, config: CLIPConfig | None = None,
                         act: str | None = None) -> tuple[CLIPConfig, dict[str, np.ndarray]]:
  """Returns (architecture, our flat parameters) from any supported CLIP checkpoint.

  Args:
    path: a checkpoint directory or file (see the module docstring).
    config: the architecture, if it cannot be inferred (e.g. OpenAI-layout files whose head
      count is not width/64); it is checked against the tensors' shapes.
    act: activation override for OpenAI-layout files ('quick_gelu' for OpenAI's weights,
      'gelu' for most open_clip-trained ones).
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: no such CLIP checkpoint file or directory")
  if os.path.isdir(path):
    if os.path.isfile(os.path.join(path, OWN_CONFIG)):
      with open(os.path.join(path, OWN_CONFIG)) as f:
        cfg = config or CLIPConfig.from_dict(json.load(f))
      return cfg, io.read_safetensors(os.path.join(path, OWN_WEIGHTS))[0]
    if not os.path.isfile(os.path.join(path, "config.json")):
      raise CheckpointError(f"{path}: directory holds neither {OWN_CONFIG} (mediclip_jax) nor config.json "
                            "(Hugging Face CLIP)")
    with open(os.path.join(path, "config.json")) as f:
      cfg = config or config_from_hf(json.load(f))
    for name in ("model.safetensors", "pytorch_model.bin"):
      if os.path.isfile(os.path.join(path, name)):
        return cfg, from_hf(io.read_tensors(os.path.join(path, name)), cfg, os.path.join(path, name))
    raise CheckpointError(f"{path}: Hugging Face CLIP directory without model.safetensors or pytorch_model.bin")
  sd = _read_state_dict(path)
  layout = detect_layout(sd)
  if layout == "hf":
    if config is None:
      raise CheckpointError(f"{path}: a transformers-layout file needs its config.json (load the directory instead)")
    return config, from_hf(sd, config, path)
  if layout == "own":
    if config is None:
      raise CheckpointError(f"{path}: a mediclip_jax weights file needs its {OWN_CONFIG} (load the directory)")
    return config, sd
  cfg = config or config_from_openai(sd, act=act or "quick_gelu")
  return cfg, from_openai(sd, cfg, path)


def load_clip(path: str | os.PathLike, config: CLIPConfig | None = None, act: str | None = None,
              dtype=jnp.float32, param_dtype=jnp.float32) -> CLIP:
  """Builds a CLIP and fills it from any supported checkpoint (shapes and names checked)."""
  cfg, params = read_clip_checkpoint(path, config, act)
  model = create_clip(cfg, dtype=dtype, param_dtype=param_dtype)
  assign_flat_params(model, params, os.fspath(path))
  return model


def save_clip(model: CLIP, directory: str | os.PathLike) -> None:
  """Writes our own checkpoint format: clip_config.json + model.safetensors (fp32)."""
  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  io.write_safetensors(os.path.join(directory, OWN_WEIGHTS),
                       {k: v.astype(np.float32) for k, v in flat_params(model).items()},
                       metadata={"format": "mediclip_jax.clip", "version": "1"})
  with open(os.path.join(directory, OWN_CONFIG), "w") as f:
    json.dump(model.cfg.to_dict(), f, indent=2)


def clip_from_config(c) -> CLIP:
  """The backbone a config's `model.clip` section describes: converted weights, or random init.

  With a checkpoint, the named `variant` must agree with the checkpoint's architecture (the
  image size may differ: position embeddings are resampled at run time).
  """
  from mediclip_jax.models.clip import get_variant  # pylint: disable=import-outside-toplevel
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(c.dtype)
  if dtype is None:
    raise ValueError(f"model.clip.dtype must be 'float32' or 'bfloat16', got {c.dtype!r}")
  overrides = {"act": c.act} if c.act else {}
  if not c.checkpoint:
    return create_clip(get_variant(c.variant, **overrides), seed=c.random_init_seed, dtype=dtype)
  model = load_clip(c.checkpoint, act=c.act, dtype=dtype)
  expected = get_variant(c.variant, **overrides)
  got = model.cfg
  fields = ("vision_width", "vision_layers", "patch_size", "text_width", "text_layers", "embed_dim")
  diff = [f"{f}: variant {getattr(expected, f)} vs checkpoint {getattr(got, f)}"
          for f in fields if getattr(expected, f) != getattr(got, f)]
  if diff:
    raise CheckpointError(f"{c.checkpoint}: does not match model.clip.variant={c.variant!r} ({'; '.join(diff)})")
  return model
