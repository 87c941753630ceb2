"""Converts CLIP or VAE weights to safetensors checkpoints that load without torch.

  python launch/convert_weights.py --src ~/models/clip-vit-large-patch14 --out ckpt/vit_l14
  python launch/convert_weights.py --src ViT-L-14.pt --out ckpt/vit_l14            # OpenAI TorchScript
  python launch/convert_weights.py --src open_clip_model.safetensors --act gelu --out ckpt/x
  python launch/convert_weights.py --kind vae --src ~/models/sd-vae-ft-mse --out ckpt/sd_vae
  python launch/convert_weights.py --kind vae --src medvae_4x1.ckpt --vae_layout compvis --out ckpt/medvae
  python launch/convert_weights.py --kind vae --src ../shared/weights/taef2 --out ckpt/taef2

CLIP (`--kind clip`, the default): the source is a Hugging Face CLIP directory or an OpenAI /
open_clip .pt/.bin/.pth/.safetensors file, of any ViT architecture (read from the tensors).
The output directory holds clip_config.json and model.safetensors (fp32); point
`model.clip.checkpoint` at it.

VAE (`--kind vae`): the source is an AutoencoderKL checkpoint (a diffusers directory, or one
file in the diffusers or CompVis/LDM layout, MedVAE LoRA merged). The output is a diffusers
directory (config.json with the architecture read from the source, and
diffusion_pytorch_model.safetensors, fp32); point `vae.path` at it with `vae.kind=autoencoder_kl`.
Scaling fields the source does not state (single files) stay those of the run's config.
A TAEF2 directory (taef2_{encoder,decoder}.pth) becomes a directory holding
taef2_{encoder,decoder}.safetensors (dtypes kept); point `vae.path` at it with `vae.kind=taef2`.

Every conversion builds the model and checks each tensor's name and shape before writing.
Nothing is downloaded.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
from absl import app, flags

from mediclip_jax import config_utils

from mediclip_jax.models import vae as vae_lib
from mediclip_jax.models.clip import load_clip, save_clip
from mediclip_jax.weights import io, vae_convert
from mediclip_jax.weights.params import flat_params

_SRC = flags.DEFINE_string("src", None, "Checkpoint file or directory to convert.")
_OUT = flags.DEFINE_string("out", None, "Output directory (must not hold another checkpoint unless --overwrite).")
_KIND = flags.DEFINE_enum("kind", "clip", ["clip", "vae"], "What the source holds: a CLIP model or an AutoencoderKL VAE.")
_ACT = flags.DEFINE_enum("act", None, ["quick_gelu", "gelu"], "CLIP activation override (OpenAI weights: "
                         "quick_gelu; most open_clip-trained weights: gelu). Default: the source's config, else quick_gelu.")
_VAE_LAYOUT = flags.DEFINE_enum("vae_layout", "auto", ["auto", "diffusers", "compvis"],
                                "Key layout of a single-file VAE source; auto detects it from the key names.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing checkpoint in --out.")

CLIP_WEIGHTS = "model.safetensors"
VAE_WEIGHTS = "diffusion_pytorch_model.safetensors"


def _n_params(tensors) -> float:
  """Millions of parameters in a name -> array dict."""
  return sum(int(v.size) for v in tensors.values()) / 1e6


def convert_clip(src: str, out: str, act: str | None = None) -> str:
  """Writes `src` as our CLIP checkpoint in `out`; returns a one-line summary."""
  model = load_clip(src, act=act)
  io.check_finite(flat_params(model), src)
  save_clip(model, out)
  return f"wrote {out}: {model.cfg} ({_n_params(flat_params(model)):.1f} M parameters)"


def is_taef2_dir(src: str) -> bool:
  """Whether `src` is a directory holding TAEF2 weight files (.pth or .safetensors)."""
  names = vae_convert.TAEF2_FILES + vae_convert.TAEF2_SAFETENSORS
  return os.path.isdir(src) and any(os.path.isfile(os.path.join(src, n)) for n in names)


def convert_taef2(src: str, out: str) -> str:
  """Writes the TAEF2 directory `src` as taef2_{encoder,decoder}.safetensors in `out`; returns a summary."""
  cfg = vae_lib.default_config()
  cfg.kind = vae_lib.KIND_TAEF2
  cfg.path = src
  vae_lib.load_vae(cfg)  # names and shapes checked against the model
  for name in vae_convert.TAEF2_FILES + vae_convert.TAEF2_SAFETENSORS:
    if os.path.isfile(os.path.join(src, name)):
      io.check_finite(io.read_tensors(os.path.join(src, name)), os.path.join(src, name))
  tensors = vae_convert.write_taef2_safetensors(src, out)
  return f"wrote {out}: TAEF2 ({_n_params(tensors):.2f} M parameters)"


def convert_vae(src: str, out: str, layout: str = "auto") -> str:
  """Writes the AutoencoderKL checkpoint `src` as a diffusers safetensors directory `out`; returns a summary."""
  tensors, arch = vae_convert.read_autoencoder_kl(src, layout=layout)
  io.check_finite(tensors, src)
  cfg = vae_lib.default_config()
  cfg.kind = vae_lib.KIND_KL
  for k, v in arch.items():
    cfg[k] = v
  vae_convert.assign_torch_state(vae_lib.build_vae(cfg), tensors, source=src)  # names and shapes checked
  os.makedirs(out, exist_ok=True)
  io.write_safetensors(os.path.join(out, VAE_WEIGHTS), {k: np.asarray(v, np.float32) for k, v in tensors.items()},
                       metadata={"format": "mediclip_jax.vae", "source": os.path.basename(os.path.normpath(src))})
  config = {"_class_name": "AutoencoderKL", **{k: list(v) if isinstance(v, tuple) else v for k, v in arch.items()}}
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  return f"wrote {out}: AutoencoderKL {arch} ({_n_params(tensors):.1f} M parameters)"


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  src, out, kind = _SRC.value, _OUT.value, _KIND.value
  taef2 = kind == "vae" and is_taef2_dir(src)
  weights = CLIP_WEIGHTS if kind == "clip" else vae_convert.TAEF2_SAFETENSORS[0] if taef2 else VAE_WEIGHTS
  if os.path.exists(os.path.join(out, weights)) and not _OVERWRITE.value:
    print(f"error: {out} already holds a checkpoint; pass --overwrite to replace it", file=sys.stderr)
    return 2
  try:
    if kind == "clip":
      summary = convert_clip(src, out, _ACT.value)
    elif taef2:
      summary = convert_taef2(src, out)
    else:
      summary = convert_vae(src, out, _VAE_LAYOUT.value)
  except (io.CheckpointError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(summary)
  return 0


if __name__ == "__main__":
  flags.mark_flags_as_required(["src", "out"])
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=config_utils.parse_flags)
