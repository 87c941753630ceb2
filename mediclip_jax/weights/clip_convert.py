"""Read and write CLIP weights in the formats users have, without network access or a model.

This module only moves tensors: it returns the architecture as a plain dict (the fields of
`mediclip_jax.models.clip.CLIPConfig`) and the parameters as a flat dict of numpy arrays in
our dotted names ('visual.blocks.0.attn.qkv.kernel', ...). Building the network from them is
`mediclip_jax.models.clip.load_clip`.

Accepted sources:
  * our own checkpoint: a directory with `clip_config.json` + `model.safetensors`
    (written by `write_clip_checkpoint`, e.g. through `launch/convert_weights.py`);
  * a Hugging Face CLIP directory: `config.json` + `model.safetensors` or `pytorch_model.bin`;
  * an OpenAI / open_clip state dict: `.safetensors`, `.pt`, `.pth`, `.bin` (pickles through
    `torch.load(weights_only=True)`; OpenAI's original TorchScript `.pt` archives through
    `torch.jit.load`, which runs no Python unpickling).
Key layouts are recognised from the tensor names, so a `.safetensors` file in any of the three
layouts loads. The architecture is read from the tensor shapes (widths, depths, patch size,
grid, context length, vocabulary, embedding width, MLP ratio); only the head count is not
stored in the tensors: it is taken from the Hugging Face config.json or our clip_config.json
where there is one, and otherwise set to width / 64 as OpenAI's builder does.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping

import numpy as np

from mediclip_jax.weights import io
from mediclip_jax.weights.io import CheckpointError

OWN_CONFIG = "clip_config.json"
OWN_WEIGHTS = "model.safetensors"
# The fields of an architecture dict, as CLIPConfig names them.
ARCH_FIELDS = ("embed_dim", "image_size", "patch_size", "vision_width", "vision_layers", "vision_heads",
               "text_width", "text_layers", "text_heads", "context_length", "vocab_size", "mlp_ratio", "act",
               "ln_eps")
ACTIVATIONS = ("quick_gelu", "gelu")
# OpenAI's builder (and open_clip's default) gives every attention head 64 channels.
HEAD_WIDTH = 64
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


def _check_act(act: str, source: str) -> str:
  if act not in ACTIVATIONS:
    raise CheckpointError(f"{source}: activation {act!r} unsupported; expected one of {', '.join(ACTIVATIONS)}")
  return act


def check_arch(arch: Mapping, source: str) -> dict:
  """A complete architecture dict (every ARCH_FIELDS name, nothing else), as a new dict."""
  missing = [f for f in ARCH_FIELDS if f not in arch]
  unknown = sorted(set(arch) - set(ARCH_FIELDS))
  if missing or unknown:
    raise CheckpointError(f"{source}: CLIP architecture "
                          + (f"lacks fields {missing} " if missing else "")
                          + (f"has unknown fields {unknown}" if unknown else ""))
  _check_act(arch["act"], source)
  return {f: arch[f] for f in ARCH_FIELDS}


# ---------------------------------------------------------------- architecture from tensors


def _heads(width: int, tower: str, source: str) -> int:
  if width % HEAD_WIDTH:
    raise CheckpointError(
        f"{source}: {tower} width {width} is not a multiple of {HEAD_WIDTH}, so its head count cannot be "
        "inferred from the tensors; pass the architecture explicitly (load_clip(..., config=...))")
  return width // HEAD_WIDTH


def infer_arch(params: Mapping[str, np.ndarray], source: str, act: str = "quick_gelu") -> dict:
  """The architecture implied by our flat parameters' shapes (heads: width / 64; `act` as given).

  Raises CheckpointError when a needed tensor is absent, the position embedding is not a
  class token plus a square grid, or the two towers' MLP ratios differ.
  """
  try:
    patch, _, _, vw = params["visual.patch_embed"].shape
    n_pos = params["visual.pos_embed"].shape[0]
    vocab, tw = params["text.token_embedding"].shape
    v_hidden = params["visual.blocks.0.fc.kernel"].shape[1]
    t_hidden = params["text.blocks.0.fc.kernel"].shape[1]
    arch = dict(
        embed_dim=int(params["visual.proj"].shape[1]), patch_size=int(patch),
        vision_width=int(vw), vision_layers=_count_blocks(params, "visual.blocks."),
        vision_heads=_heads(int(vw), "vision", source),
        text_width=int(tw), text_layers=_count_blocks(params, "text.blocks."),
        text_heads=_heads(int(tw), "text", source),
        context_length=int(params["text.pos_embed"].shape[0]), vocab_size=int(vocab),
        act=_check_act(act, source), ln_eps=1e-5)
  except KeyError as e:
    raise CheckpointError(f"{source}: lacks tensor {e.args[0]!r}, needed to infer the CLIP architecture") from e
  grid = math.isqrt(max(n_pos - 1, 0))
  if grid * grid != n_pos - 1:
    raise CheckpointError(f"{source}: vision position embedding has {n_pos} rows, not 1 + a square grid")
  if v_hidden * tw != t_hidden * vw:
    raise CheckpointError(f"{source}: vision MLP ratio {v_hidden}/{vw} differs from text MLP ratio "
                          f"{t_hidden}/{tw}; one shared ratio is supported")
  arch["image_size"] = int(patch) * grid
  arch["mlp_ratio"] = v_hidden / vw
  return check_arch(arch, source)


def arch_from_hf_config(hf: Mapping) -> dict:
  """Architecture dict from a transformers `config.json` dict of a CLIPModel."""
  try:
    v, t = hf["vision_config"], hf["text_config"]
    acts = {v.get("hidden_act", "quick_gelu"), t.get("hidden_act", "quick_gelu")}
    if len(acts) != 1 or not acts <= set(ACTIVATIONS):
      raise CheckpointError(f"config.json: hidden_act {sorted(acts)} unsupported; expected one of quick_gelu, gelu")
    ratios = {v["intermediate_size"] / v["hidden_size"], t["intermediate_size"] / t["hidden_size"]}
    if len(ratios) != 1:
      raise CheckpointError(f"config.json: vision and text MLP ratios differ ({sorted(ratios)}); unsupported")
    eps = {v.get("layer_norm_eps", 1e-5), t.get("layer_norm_eps", 1e-5)}
    return dict(
        embed_dim=hf.get("projection_dim", 512), image_size=v["image_size"], patch_size=v["patch_size"],
        vision_width=v["hidden_size"], vision_layers=v["num_hidden_layers"], vision_heads=v["num_attention_heads"],
        text_width=t["hidden_size"], text_layers=t["num_hidden_layers"], text_heads=t["num_attention_heads"],
        context_length=t.get("max_position_embeddings", 77), vocab_size=t.get("vocab_size", 49408),
        mlp_ratio=ratios.pop(), act=acts.pop(), ln_eps=eps.pop() if len(eps) == 1 else 1e-5)
  except KeyError as e:
    raise CheckpointError(f"config.json lacks field {e.args[0]!r} of a transformers CLIPModel config") from e


# ---------------------------------------------------------------- key layouts

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

_HF_BLOCK: BlockTable = (
    ("ln_1.scale", ("layer_norm1.weight",), False), ("ln_1.bias", ("layer_norm1.bias",), False),
    ("attn.qkv.kernel", tuple(f"self_attn.{n}_proj.weight" for n in "qkv"), True),
    ("attn.qkv.bias", tuple(f"self_attn.{n}_proj.bias" for n in "qkv"), False),
    ("attn.out.kernel", ("self_attn.out_proj.weight",), True), ("attn.out.bias", ("self_attn.out_proj.bias",), False),
    ("ln_2.scale", ("layer_norm2.weight",), False), ("ln_2.bias", ("layer_norm2.bias",), False),
    ("fc.kernel", ("mlp.fc1.weight",), True), ("fc.bias", ("mlp.fc1.bias",), False),
    ("proj.kernel", ("mlp.fc2.weight",), True), ("proj.bias", ("mlp.fc2.bias",), False),
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


def _check_keys(sd: Mapping[str, np.ndarray], used: set[str], source: str, layout: str) -> None:
  missing = sorted(used - set(sd))
  extra = sorted(k for k in sd if k not in used and not k.endswith(_IGNORED))
  if missing or extra:
    raise CheckpointError(f"{source}: {layout} layout: "
                          + (f"missing tensors {missing[:20]} " if missing else "")
                          + (f"unexpected tensors {extra[:20]}" if extra else ""))


def from_openai(sd: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
  """OpenAI / open_clip state dict -> our flat parameter names (block counts read from the keys)."""
  v_prefix, t_prefix = "visual.transformer.resblocks.", "transformer.resblocks."
  nv, nt = _count_blocks(sd, v_prefix), _count_blocks(sd, t_prefix)
  used = {"visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding",
          "visual.ln_pre.weight", "visual.ln_pre.bias", "visual.ln_post.weight", "visual.ln_post.bias",
          "visual.proj", "token_embedding.weight", "positional_embedding", "ln_final.weight",
          "ln_final.bias", "text_projection", "logit_scale"}
  used |= _block_keys(_OPENAI_BLOCK, v_prefix, nv) | _block_keys(_OPENAI_BLOCK, t_prefix, nt)
  _check_keys(sd, used, source, "OpenAI/open_clip")
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
  _convert_blocks(sd, _OPENAI_BLOCK, v_prefix, "visual.blocks.", nv, out)
  _convert_blocks(sd, _OPENAI_BLOCK, t_prefix, "text.blocks.", nt, out)
  return out


def from_hf(sd: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
  """transformers CLIPModel state dict -> our flat parameter names (block counts read from the keys)."""
  v, t = "vision_model.", "text_model."
  nv, nt = _count_blocks(sd, f"{v}encoder.layers."), _count_blocks(sd, f"{t}encoder.layers.")
  used = {f"{v}embeddings.class_embedding", f"{v}embeddings.patch_embedding.weight",
          f"{v}embeddings.position_embedding.weight", f"{v}pre_layrnorm.weight", f"{v}pre_layrnorm.bias",
          f"{v}post_layernorm.weight", f"{v}post_layernorm.bias", "visual_projection.weight",
          f"{t}embeddings.token_embedding.weight", f"{t}embeddings.position_embedding.weight",
          f"{t}final_layer_norm.weight", f"{t}final_layer_norm.bias", "text_projection.weight", "logit_scale"}
  used |= _block_keys(_HF_BLOCK, f"{v}encoder.layers.", nv) | _block_keys(_HF_BLOCK, f"{t}encoder.layers.", nt)
  _check_keys(sd, used, source, "transformers CLIP")
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
  _convert_blocks(sd, _HF_BLOCK, f"{v}encoder.layers.", "visual.blocks.", nv, out)
  _convert_blocks(sd, _HF_BLOCK, f"{t}encoder.layers.", "text.blocks.", nt, out)
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


def _read_dir(path: str) -> tuple[dict | None, dict[str, np.ndarray], str]:
  """(architecture from the directory's config file, our flat parameters, weights file) of a checkpoint directory."""
  if os.path.isfile(os.path.join(path, OWN_CONFIG)):
    with open(os.path.join(path, OWN_CONFIG)) as f:
      arch = json.load(f)
    weights = os.path.join(path, OWN_WEIGHTS)
    return arch, io.read_safetensors(weights)[0], weights
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise CheckpointError(f"{path}: directory holds neither {OWN_CONFIG} (mediclip_jax) nor config.json "
                          "(Hugging Face CLIP)")
  with open(os.path.join(path, "config.json")) as f:
    arch = arch_from_hf_config(json.load(f))
  for name in ("model.safetensors", "pytorch_model.bin"):
    weights = os.path.join(path, name)
    if os.path.isfile(weights):
      return arch, from_hf(io.read_tensors(weights), weights), weights
  raise CheckpointError(f"{path}: Hugging Face CLIP directory without model.safetensors or pytorch_model.bin")


def read_clip_checkpoint(path: str | os.PathLike, arch: Mapping | None = None,
                         act: str | None = None) -> tuple[dict, dict[str, np.ndarray]]:
  """Returns (architecture dict, our flat parameters) from any supported CLIP checkpoint.

  Args:
    path: a checkpoint directory or file (see the module docstring).
    arch: the architecture (all ARCH_FIELDS), used instead of the file's config or the
      tensors' shapes, e.g. for OpenAI-layout files whose head width is not 64. Whether it
      fits the tensors is checked when they are assigned to a model.
    act: activation override, for every layout ('quick_gelu' for OpenAI's weights, 'gelu'
      for most open_clip-trained ones). Without it: the config file's, else quick_gelu.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: no such CLIP checkpoint file or directory")
  if os.path.isdir(path):
    found, params, source = _read_dir(path)
  else:
    sd, source = _read_state_dict(path), path
    layout = detect_layout(sd)
    params = {"hf": from_hf, "openai": from_openai}[layout](sd, path) if layout != "own" else sd
    found = None
  if arch is None:
    arch = found if found is not None else infer_arch(params, source)
  arch = check_arch(arch, source)
  if act is not None:
    arch["act"] = _check_act(act, source)
  return arch, params


def write_clip_checkpoint(directory: str | os.PathLike, arch: Mapping, params: Mapping[str, np.ndarray],
                          metadata: Mapping[str, str] | None = None) -> None:
  """Writes our own checkpoint format: clip_config.json + model.safetensors (fp32); `metadata` (strings, e.g. the
  training config of adapted towers) joins the safetensors header."""
  directory = os.fspath(directory)
  arch = check_arch(arch, directory)
  os.makedirs(directory, exist_ok=True)
  io.write_safetensors(os.path.join(directory, OWN_WEIGHTS),
                       {k: np.asarray(v, np.float32) for k, v in params.items()},
                       metadata={**(metadata or {}), "format": "mediclip_jax.clip", "version": "1"})
  with open(os.path.join(directory, OWN_CONFIG), "w") as f:
    json.dump(arch, f, indent=2)
