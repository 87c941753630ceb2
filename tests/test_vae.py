"""VAE parity with diffusers' PyTorch AutoencoderKL (diffusers and CompVis layouts), the codec synthesis runs,
TAEF2 round-trip quality, and the PSNR/SSIM the VAE quality gate uses."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipelines import normal_images
from mediclip_jax.evaluate import image_quality
from mediclip_jax.models import vae as V
from mediclip_jax.weights.io import CheckpointError

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TINY = dict(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
            norm_num_groups=4, sample_size=16,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
VARIANTS = {
    "4ch": dict(latent_channels=4, scaling_factor=0.18215),
    "16ch": dict(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
                 use_quant_conv=False, use_post_quant_conv=False),
}


def _torch_vae(variant: str):
  """A tiny diffusers AutoencoderKL with every parameter perturbed (norms included), fp32, eval mode."""
  torch.manual_seed(0)
  m = diffusers.AutoencoderKL(**TINY, **VARIANTS[variant]).eval()
  with torch.no_grad():
    for p in m.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return m


def _torch_outputs(m, x_nhwc: np.ndarray, z_nhwc: np.ndarray):
  with torch.no_grad():
    mean = m.encode(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)).latent_dist.mean
    dec = m.decode(torch.from_numpy(z_nhwc).permute(0, 3, 1, 2)).sample
  return mean.permute(0, 2, 3, 1).numpy(), dec.permute(0, 2, 3, 1).numpy()


def _inputs(latent_channels: int):
  rng = np.random.default_rng(1)
  x = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  z = rng.normal(size=(2, 8, 8, latent_channels)).astype(np.float32)
  return x, z


def _kl_cfg(path, **kw):
  cfg = V.default_config()
  cfg.kind = V.KIND_KL
  cfg.path = str(path)
  for k, v in kw.items():
    cfg[k] = v
  return cfg


def _max_err(ours, x, z, ref_mean, ref_dec):
  mean = np.asarray(ours.encode(jnp.asarray(x)))
  dec = np.asarray(ours.decode(jnp.asarray(z)))
  return float(np.abs(mean - ref_mean).max()), float(np.abs(dec - ref_dec).max())


@pytest.mark.slow
@pytest.mark.parametrize("variant,safe", [("4ch", True), ("16ch", False)])
def test_autoencoder_kl_matches_diffusers(tmp_path, variant, safe):
  """A save_pretrained directory (.safetensors for 4ch, .bin for 16ch) loads and matches encode mean / decode to 1e-4."""
  m = _torch_vae(variant)
  m.save_pretrained(tmp_path, safe_serialization=safe)
  ours = V.load_vae(_kl_cfg(tmp_path, norm_num_groups=32, block_out_channels=(64,)))  # config.json must win
  assert ours.latent_channels == VARIANTS[variant]["latent_channels"]
  assert ours.scaling_factor == pytest.approx(VARIANTS[variant]["scaling_factor"])
  assert ours.shift_factor == pytest.approx(VARIANTS[variant].get("shift_factor", 0.0))
  assert (ours.quant_conv is None) == (variant == "16ch")
  x, z = _inputs(ours.latent_channels)
  ref_mean, ref_dec = _torch_outputs(m, x, z)
  e_enc, e_dec = _max_err(ours, x, z, ref_mean, ref_dec)
  print(f"\n{variant}: max abs error encode {e_enc:.2e}, decode {e_dec:.2e}")
  assert e_enc < 1e-4 and e_dec < 1e-4

  # The gray wrapper: replicate, map [0,1] -> [-1,1], z = (mean - shift)·scale.
  g = x[..., 0] * 0.5 + 0.5
  zg = np.asarray(V.encode_gray(ours, jnp.asarray(g)))
  ref_g, _ = _torch_outputs(m, np.repeat(g[..., None] * 2 - 1, 3, -1), z)
  want = (ref_g - ours.shift_factor) * ours.scaling_factor
  np.testing.assert_allclose(zg, want, atol=1e-4 * max(1.0, ours.scaling_factor))
  img = np.asarray(V.decode_gray(ours, jnp.asarray(zg)))
  assert img.shape == g.shape and img.min() >= 0 and img.max() <= 1


def _diffusers_to_ldm(sd: dict) -> dict:
  """Test-side inverse of the LDM->diffusers renaming, written from the CompVis module names."""
  n_up = 1 + max(int(m.group(1)) for k in sd for m in [re.match(r"decoder\.up_blocks\.(\d+)\.", k)] if m)
  out = {}
  for k, v in sd.items():
    v = v.clone()
    k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", k)
    k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
    m = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.*)", k)
    if m:
      lvl = n_up - 1 - int(m.group(1))
      k = (f"decoder.up.{lvl}.block.{m.group(3)}.{m.group(4)}" if m.group(3) is not None
           else f"decoder.up.{lvl}.upsample.{m.group(4)}")
    k = k.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
    m = re.match(r"(.*)mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)", k)
    if m:
      name = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}[m.group(2)]
      k = f"{m.group(1)}mid.attn_1.{name}.{m.group(3)}"
      if name != "norm" and m.group(3) == "weight":
        v = v[:, :, None, None]  # LDM uses 1×1 convs for q/k/v/proj_out
    k = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    out[k] = v
  return out


@pytest.mark.slow
def test_compvis_layout_with_lora_matches_diffusers(tmp_path):
  """The same weights renamed to LDM keys (a Lightning .ckpt, one conv as a MedVAE LoRA wrapper, a stage-2 head) load identically."""
  m = _torch_vae("4ch")
  ldm = _diffusers_to_ldm(m.state_dict())
  assert "encoder.mid.attn_1.q.weight" in ldm and "decoder.up.0.block.0.conv1.weight" in ldm
  assert "decoder.up.1.upsample.conv.weight" in ldm
  # LoRA: conv.weight + up·down must give back the original weight.
  p = "encoder.down.0.block.0.conv1"
  w = ldm.pop(p + ".weight")
  g = torch.Generator().manual_seed(3)
  down = torch.randn(2, w.shape[1], 3, 3, generator=g) * 0.1
  up = torch.randn(w.shape[0], 2, 1, 1, generator=g) * 0.1
  ldm[p + ".conv.weight"] = w - torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
  ldm[p + ".conv.bias"] = ldm.pop(p + ".bias")
  ldm[p + ".lora_down.weight"], ldm[p + ".lora_up.weight"] = down, up
  ldm["channel_proj.weight"] = torch.zeros(4, 4, 1, 1)
  f = tmp_path / "medvae_like.ckpt"
  torch.save({"state_dict": ldm, "epoch": 3}, f)
  ours = V.load_vae(_kl_cfg(f, norm_num_groups=4, block_out_channels=(64,), latent_channels=1))  # shapes win
  x, z = _inputs(4)
  ref_mean, ref_dec = _torch_outputs(m, x, z)
  e_enc, e_dec = _max_err(ours, x, z, ref_mean, ref_dec)
  print(f"\ncompvis: max abs error encode {e_enc:.2e}, decode {e_dec:.2e}")
  assert e_enc < 1e-4 and e_dec < 1e-4


@pytest.mark.slow
def test_bad_checkpoint_names_missing_and_misshaped_tensors(tmp_path):
  m = _torch_vae("4ch")
  m.save_pretrained(tmp_path)
  from mediclip_jax.weights.io import read_safetensors, write_safetensors  # pylint: disable=import-outside-toplevel
  f = tmp_path / "diffusion_pytorch_model.safetensors"
  sd, meta = read_safetensors(f)
  del sd["decoder.conv_out.bias"]
  sd["encoder.mid_block.attentions.0.to_q.weight"] = np.zeros((16, 8), np.float32)
  write_safetensors(f, sd, meta)
  with pytest.raises(CheckpointError) as e:
    V.load_vae(_kl_cfg(tmp_path))
  msg = str(e.value)
  assert "decoder.conv_out.bias" in msg and "encoder.mid_block.attentions.0.to_q.weight" in msg
  assert str(tmp_path) in msg

  cfg = V.default_config()
  cfg.path = str(tmp_path)  # kind taef2, a directory without the .pth files
  with pytest.raises(CheckpointError, match="taef2_encoder.pth"):
    V.load_vae(cfg)


@pytest.mark.slow
def test_random_init_dtype_policy_and_codec():
  """bf16 compute keeps float32 parameters; both classes map (B,H,W) images to (B,H/8,W/8,C) latents;
  `vae.codec` gives synthesis the grey wrappers as jittable pure functions of the VAE state."""
  cfg = V.default_config()
  cfg.dtype = "bfloat16"
  cfg.taef2_channels = 8
  cfg.taef2_latent_channels = 4
  tae = V.build_vae(cfg)
  leaves = jax.tree.leaves(nnx.state(tae, nnx.Param))
  assert leaves and all(a.dtype == jnp.float32 for a in leaves)
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 32, 32)), jnp.float32)
  z = V.encode_gray(tae, x)
  y = V.decode_gray(tae, z)
  assert z.shape == (2, 4, 4, 4) and y.shape == (2, 32, 32)
  codec = V.codec(tae)
  np.testing.assert_array_equal(np.asarray(codec.encode(codec.state, x)), np.asarray(z))
  np.testing.assert_array_equal(np.asarray(codec.decode(codec.state, z)), np.asarray(y))
  zj, yj = jax.jit(lambda s, v: (codec.encode(s, v), codec.decode(s, codec.encode(s, v))))(codec.state, x)
  np.testing.assert_allclose(np.asarray(zj), np.asarray(z), atol=0.05)  # bf16: fusion changes roundings
  np.testing.assert_allclose(np.asarray(yj), np.asarray(y), atol=0.05)
  with pytest.raises(ValueError, match="vae.kind"):
    cfg.kind = "vqgan"
    V.build_vae(cfg)


def test_psnr_and_ssim():
  """PSNR from the MSE; SSIM 1 for equal images, lower with more noise, insensitive to nothing else."""
  rng = np.random.default_rng(0)
  x = rng.uniform(0.2, 0.8, (2, 48, 48)).astype(np.float32)
  y = x + np.float32(0.01)
  np.testing.assert_allclose(np.asarray(image_quality.psnr(jnp.asarray(y), jnp.asarray(x))), 40.0, atol=1e-3)
  np.testing.assert_allclose(np.asarray(image_quality.ssim(jnp.asarray(x), jnp.asarray(x))), 1.0, atol=1e-6)
  noisy = [np.clip(x + s * rng.normal(size=x.shape), 0, 1).astype(np.float32) for s in (0.02, 0.1)]
  s_lo, s_hi = (np.asarray(image_quality.ssim(jnp.asarray(n), jnp.asarray(x))) for n in noisy)
  assert np.all(s_hi < s_lo) and np.all(s_lo < 1.0)
  np.testing.assert_allclose(np.asarray(image_quality.ssim(jnp.asarray(x), jnp.asarray(noisy[1]))), s_hi, atol=1e-6)


@pytest.mark.slow
def test_taef2_real_weights_round_trip_psnr(shared_dir):
  """The real TAEF2 weights reconstruct BrainMRI and BUSI support images at 256² with mean PSNR ≥ 31 dB."""
  cfg = V.default_config()
  cfg.path = str(shared_dir / "weights" / "taef2")
  codec = V.codec(V.load_vae(cfg))

  @jax.jit
  def round_trip(state, x):
    z = codec.encode(state, x)
    return codec.decode(state, z), z

  for ds in ("brainmri", "busi"):
    x = normal_images.load_normal_images(shared_dir / "data" / ds, 256, 4)[0]
    y, z = round_trip(codec.state, jnp.asarray(x))
    assert z.shape == (4, 32, 32, 32)
    psnr = np.asarray(image_quality.psnr(y, jnp.asarray(x)))
    print(f"\nTAEF2 {ds} 256²: PSNR per image {np.round(psnr, 2).tolist()}, mean {psnr.mean():.2f} dB")
    assert psnr.mean() >= 31.0


@pytest.mark.slow
def test_taef2_safetensors_conversion_matches_pth_and_loads_without_torch(shared_dir, tmp_path):
  """convert_weights.py --kind vae turns the TAEF2 .pth pair into safetensors that encode/decode identically;
  the safetensors are preferred beside .pth files and load with torch unimportable; half a pair is named."""
  import os
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  src, out = shared_dir / "weights" / "taef2", tmp_path / "taef2_st"
  conv = subprocess.run([sys.executable, "launch/convert_weights.py", "--kind", "vae", "--src", str(src),
                         "--out", str(out)], cwd=repo, capture_output=True, text=True, timeout=300)
  assert conv.returncode == 0, conv.stderr[-2000:]
  assert sorted(os.listdir(out)) == ["taef2_decoder.safetensors", "taef2_encoder.safetensors"]
  x = jnp.asarray(normal_images.load_normal_images(shared_dir / "data" / "brainmri", 64, 3)[0])
  outs = []
  for path in (src, out):
    cfg = V.default_config()
    cfg.path = str(path)
    codec = V.codec(V.load_vae(cfg))
    z = codec.encode(codec.state, x)
    outs.append((np.asarray(z), np.asarray(codec.decode(codec.state, z))))
  np.testing.assert_array_equal(outs[0][0], outs[1][0])
  np.testing.assert_array_equal(outs[0][1], outs[1][1])
  np.save(tmp_path / "x.npy", np.asarray(x))
  import shutil
  for n in ("taef2_encoder.pth", "taef2_decoder.pth"):  # both formats: the safetensors win (torch blocked below)
    shutil.copy(src / n, out / n)
  script = ("import sys; sys.modules['torch'] = None\n"
            "import numpy as np, jax.numpy as jnp\n"
            "from mediclip_jax.models import vae as V\n"
            f"cfg = V.default_config(); cfg.path = {str(out)!r}\n"
            "codec = V.codec(V.load_vae(cfg))\n"
            f"z = codec.encode(codec.state, jnp.asarray(np.load({str(tmp_path / 'x.npy')!r})))\n"
            f"np.save({str(tmp_path / 'z.npy')!r}, np.asarray(z))\n"
            "assert sys.modules['torch'] is None\n")
  run = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  np.testing.assert_array_equal(np.load(tmp_path / "z.npy"), outs[0][0])
  blocked = subprocess.run([sys.executable, "-c", script.replace(str(out), str(src))], cwd=repo,
                           capture_output=True, text=True, timeout=300)
  assert blocked.returncode != 0  # the .pth pair does need torch: the block above is effective
  half = tmp_path / "half"
  half.mkdir()
  shutil.copy(out / "taef2_encoder.safetensors", half)
  cfg = V.default_config()
  cfg.path = str(half)
  with pytest.raises(CheckpointError) as e:
    V.load_vae(cfg)
  assert str(half) in str(e.value) and "taef2_decoder.safetensors" in str(e.value)
