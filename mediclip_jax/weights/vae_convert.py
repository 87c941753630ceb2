"""PyTorch VAE checkpoints (diffusers, CompVis/LDM, TAEF2 layouts) -> our Flax NNX VAEs.

Every parameter of our modules has a path whose dotted form is its PyTorch key once the
leaf is renamed (`kernel`/`scale` -> `weight`), because the modules mirror the PyTorch
names. So loading is: bring the checkpoint to diffusers (or TAEF2 nn.Sequential) keys,
check every tensor's presence and shape against the model (io.check_tensors), transpose
kernels, and update the model. Sources: diffusers directories (config.json +
diffusion_pytorch_model.safetensors/.bin), single safetensors/.ckpt/.pth/.bin files in
the diffusers or CompVis/LDM layout (MedVAE: LoRA merged, stage-2 head dropped), TAEF2
directories (fp16 .pth, or the .safetensors pair written by write_taef2_safetensors; upcast to fp32).
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mediclip_jax.weights.io import CheckpointError, check_tensors, read_tensors, write_safetensors

TAEF2_FILES = ("taef2_encoder.pth", "taef2_decoder.pth")
TAEF2_SAFETENSORS = ("taef2_encoder.safetensors", "taef2_decoder.safetensors")
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# LDM/MedVAE checkpoint parts that are not the autoencoder (training losses, EMA, MedVAE stage-2 head).
IGNORED_PREFIXES = ("loss.", "model_ema.", "channel_ds.", "channel_proj.", "lpips.")


def torch_key(path: tuple) -> str:
  """Our parameter path -> its PyTorch state-dict key."""
  parts = [str(p) for p in path]
  if parts[-1] in ("kernel", "scale"):
    parts[-1] = "weight"
  return ".".join(parts)


def _to_flax(a: np.ndarray, ndim: int) -> np.ndarray:
  """PyTorch layout -> Flax layout: conv (O,I,kh,kw)->(kh,kw,I,O), linear (O,I)->(I,O)."""
  if ndim == 4:
    return np.transpose(a, (2, 3, 1, 0))
  if ndim == 2:
    return a.T
  return a


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  if len(shape) == 4:
    kh, kw, i, o = shape
    return (o, i, kh, kw)
  if len(shape) == 2:
    return (shape[1], shape[0])
  return tuple(shape)


def expected_torch_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
  """PyTorch key -> PyTorch shape for every parameter of `model`."""
  state = nnx.state(model, nnx.Param)
  return {torch_key(p): _torch_shape(tuple(v.shape)) for p, v in nnx.to_flat_state(state)}


def assign_torch_state(model: nnx.Module, tensors: Mapping[str, np.ndarray], source: str) -> None:
  """Loads PyTorch-keyed `tensors` into `model` in place (float32 params), after checking all names and shapes."""
  check_tensors(source, tensors, expected_torch_shapes(model))
  state = nnx.state(model, nnx.Param)
  flat = []
  for p, v in nnx.to_flat_state(state):
    a = np.asarray(tensors[torch_key(p)], dtype=np.float32)
    a = _to_flax(a, a.ndim)
    flat.append((p, v.replace(jnp.asarray(a, dtype=v.get_value().dtype))))
  nnx.update(model, nnx.from_flat_state(flat))


# ----------------------------------------------------------------------------------------
# TAEF2
# ----------------------------------------------------------------------------------------

def read_taef2(directory: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a TAEF2 directory into `encoder.layers.*`/`decoder.layers.*` keys.

  The safetensors pair (read with numpy, no torch) is preferred over the .pth pair when both exist.
  """
  directory = os.fspath(directory)
  expected = f"{' and '.join(TAEF2_SAFETENSORS)} (or {' and '.join(TAEF2_FILES)})"
  if not os.path.isdir(directory):
    raise CheckpointError(f"{directory}: vae.path for kind 'taef2' must be a directory holding {expected}")
  for names in (TAEF2_SAFETENSORS, TAEF2_FILES):
    if all(os.path.isfile(os.path.join(directory, n)) for n in names):
      break
  else:
    present = sorted(n for n in TAEF2_SAFETENSORS + TAEF2_FILES if os.path.isfile(os.path.join(directory, n)))
    raise CheckpointError(f"{directory}: missing TAEF2 weights; expected {expected}, found "
                          f"{', '.join(present) or 'none of them'}")
  out: dict[str, np.ndarray] = {}
  for part, name in zip(("encoder", "decoder"), names):
    for k, v in read_tensors(os.path.join(directory, name)).items():
      out[f"{part}.layers.{k}"] = v
  return out


def write_taef2_safetensors(src: str | os.PathLike, out: str | os.PathLike) -> dict[str, np.ndarray]:
  """Writes the TAEF2 directory `src` as taef2_{encoder,decoder}.safetensors in `out` (dtypes kept).

  Returns the tensors written, keyed as read_taef2 returns them.
  """
  tensors = read_taef2(src)
  os.makedirs(out, exist_ok=True)
  for part, name in zip(("encoder", "decoder"), TAEF2_SAFETENSORS):
    prefix = f"{part}.layers."
    write_safetensors(os.path.join(out, name), {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                      metadata={"format": "mediclip_jax.taef2", "source": os.path.basename(os.path.normpath(src))})
  return tensors


# ----------------------------------------------------------------------------------------
# AutoencoderKL: diffusers and CompVis/LDM layouts
# ----------------------------------------------------------------------------------------

_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def merge_lora(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Folds MedVAE LoRA wrappers (`p.conv.*`, `p.lora_down.weight`, `p.lora_up.weight`) into plain `p.weight/bias`.

  W = W_conv + Σ_r up[o, r] · down[r, i, kh, kw] (scale 1).
  """
  out = dict(sd)
  for k in [k for k in sd if k.endswith(".lora_down.weight")]:
    p = k[: -len(".lora_down.weight")]
    down, up = sd[k], sd.get(p + ".lora_up.weight")
    w = sd.get(p + ".conv.weight")
    if up is None or w is None:
      raise CheckpointError(f"LoRA wrapper {p!r}: expected {p}.lora_up.weight and {p}.conv.weight beside {k}")
    w32 = w.astype(np.float32)
    merged = w32 + np.einsum("or,rikl->oikl", up.reshape(up.shape[0], up.shape[1]).astype(np.float32),
                             down.astype(np.float32)).reshape(w32.shape)
    out[p + ".weight"] = merged.astype(w.dtype)
    if p + ".conv.bias" in sd:
      out[p + ".bias"] = sd[p + ".conv.bias"]
    for s in (".lora_down.weight", ".lora_up.weight", ".conv.weight", ".conv.bias"):
      out.pop(p + s, None)
  return out


def ldm_to_diffusers(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames CompVis/LDM AutoencoderKL keys to diffusers keys; decoder levels are reversed."""
  ups = {int(m.group(1)) for k in sd for m in [re.match(r"decoder\.up\.(\d+)\.", k)] if m}
  n_up = max(ups) + 1 if ups else 0
  out = {}
  for k, v in sd.items():
    nk = k
    nk = re.sub(r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2.", nk)
    nk = re.sub(r"^encoder\.down\.(\d+)\.downsample\.conv\.", r"encoder.down_blocks.\1.downsamplers.0.conv.", nk)
    m = re.match(r"^decoder\.up\.(\d+)\.(block\.(\d+)|upsample\.conv)\.(.*)$", nk)
    if m:
      i = n_up - 1 - int(m.group(1))
      mid = f"resnets.{m.group(3)}" if m.group(3) is not None else "upsamplers.0.conv"
      nk = f"decoder.up_blocks.{i}.{mid}.{m.group(4)}"
    nk = re.sub(r"\.mid\.block_1\.", ".mid_block.resnets.0.", nk)
    nk = re.sub(r"\.mid\.block_2\.", ".mid_block.resnets.1.", nk)
    m = re.match(r"^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)$", nk)
    if m:
      name = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}[m.group(2)]
      nk = f"{m.group(1)}.mid_block.attentions.0.{name}.{m.group(3)}"
      if m.group(2) != "norm" and v.ndim == 4:
        v = v.reshape(v.shape[0], v.shape[1])
    nk = nk.replace(".nin_shortcut.", ".conv_shortcut.")
    nk = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", nk)
    out[nk] = v
  return out


def _fix_diffusers_attention(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Maps legacy attention names (query/key/value/proj_attn) to to_q/to_k/to_v/to_out.0; squeezes 1×1 conv weights."""
  out = {}
  for k, v in sd.items():
    m = re.match(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$", k)
    if m:
      k = f"{m.group(1)}.{_LEGACY_ATTN[m.group(2)]}.{m.group(3)}"
    if re.search(r"\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$", k) and v.ndim == 4:
      v = v.reshape(v.shape[0], v.shape[1])
    out[k] = v
  return out


def _unwrap(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Drops wrapper prefixes (Lightning `state_dict.`, full SD `first_stage_model.`) and non-VAE parts."""
  sd = dict(sd)
  for p in ("state_dict.", "module."):
    if sd and all(k.startswith(p) for k in sd):
      sd = {k[len(p):]: v for k, v in sd.items()}
  for p in ("first_stage_model.", "vae."):
    if any(k.startswith(p) for k in sd):
      sd = {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
  return {k: v for k, v in sd.items() if not k.startswith(IGNORED_PREFIXES)}


def infer_kl_arch(sd: Mapping[str, np.ndarray], source: str) -> dict:
  """Architecture fields of a diffusers-keyed AutoencoderKL state dict, read from tensor shapes."""
  try:
    levels = sorted({int(m.group(1)) for k in sd for m in [re.match(r"encoder\.down_blocks\.(\d+)\.", k)] if m})
    boc = tuple(int(sd[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0]) for i in levels)
    layers = len({m.group(1) for k in sd for m in [re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k)] if m})
    return dict(
        in_channels=int(sd["encoder.conv_in.weight"].shape[1]),
        out_channels=int(sd["decoder.conv_out.weight"].shape[0]),
        block_out_channels=boc, layers_per_block=layers,
        latent_channels=int(sd["decoder.conv_in.weight"].shape[1]),
        use_quant_conv="quant_conv.weight" in sd, use_post_quant_conv="post_quant_conv.weight" in sd,
        mid_block_add_attention="encoder.mid_block.attentions.0.to_q.weight" in sd)
  except KeyError as e:
    raise CheckpointError(f"{source}: not an AutoencoderKL state dict (missing tensor {e.args[0]!r})") from e


_CONFIG_FIELDS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels",
                  "norm_num_groups", "scaling_factor", "shift_factor", "use_quant_conv", "use_post_quant_conv",
                  "mid_block_add_attention")


def read_diffusers_config(path: str) -> dict:
  """Architecture and scaling fields of a diffusers AutoencoderKL config.json."""
  with open(path) as f:
    c = json.load(f)
  for field, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
    bad = [t for t in c.get(field, []) if t != want]
    if bad:
      raise CheckpointError(f"{path}: {field} must all be {want!r}, got {bad}")
  if c.get("act_fn", "silu") != "silu":
    raise CheckpointError(f"{path}: act_fn must be 'silu', got {c['act_fn']!r}")
  out = {k: c[k] for k in _CONFIG_FIELDS if k in c and c[k] is not None}
  if "block_out_channels" in out:
    out["block_out_channels"] = tuple(out["block_out_channels"])
  return out


def read_autoencoder_kl(path: str | os.PathLike, layout: str = "auto") -> tuple[dict[str, np.ndarray], dict]:
  """Reads an AutoencoderKL checkpoint -> (diffusers-keyed tensors, architecture fields for the config).

  `path`: a diffusers directory, or one .safetensors/.ckpt/.pth/.bin file in the diffusers or
  CompVis/LDM layout (`layout` "auto" detects it from the key names).
  """
  path = os.fspath(path)
  arch: dict = {}
  if os.path.isdir(path):
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
      raise CheckpointError(f"{path}: a diffusers VAE directory needs config.json")
    files = [os.path.join(path, n) for n in DIFFUSERS_WEIGHTS if os.path.isfile(os.path.join(path, n))]
    if not files:
      raise CheckpointError(f"{path}: no weights; expected one of {', '.join(DIFFUSERS_WEIGHTS)}")
    arch = read_diffusers_config(cfg_path)
    sd, layout, src = read_tensors(files[0]), "diffusers", files[0]
  else:
    sd, src = read_tensors(path), path
  sd = merge_lora(_unwrap(sd))
  if layout == "auto":
    layout = "compvis" if any(k.startswith(("encoder.down.", "decoder.up.", "encoder.mid.")) for k in sd) else "diffusers"
  if layout == "compvis":
    sd = ldm_to_diffusers(sd)
  elif layout != "diffusers":
    raise ValueError(f"vae.layout: expected 'auto', 'diffusers' or 'compvis', got {layout!r}")
  sd = _fix_diffusers_attention(sd)
  inferred = infer_kl_arch(sd, src)
  for k, v in inferred.items():
    if k in arch and arch[k] != v:
      raise CheckpointError(f"{src}: config.json says {k}={arch[k]!r} but the tensors imply {v!r}")
  return sd, {**inferred, **arch}
