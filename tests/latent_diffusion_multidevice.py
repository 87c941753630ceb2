"""Run as a script with 8 fake CPU devices: the latent diffusion baseline built through `latent_diffusion.build`
on a 1-device and on an 8-device mesh takes the same steps (augmentation, timesteps and noise drawn per device
from (step, global sample index)) and scores the same maps; its step compiles once per mesh.

  python tests/latent_diffusion_multidevice.py --config configs/latent_diffusion.py:phantom,tiny \
      --config.data.image_size=32 --config.train.batch_size=8

takes launch/train.py's config flags (tests/test_latent_diffusion_train.py passes its training run's); the
training phantoms are generated as `data.phantom` would (same count, size and seed). Compilations are counted
with a `jax.monitoring` listener on the backend-compile event, over the steps only. Prints one JSON line.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from data_pipelines import datasets, oct_phantom, phantom  # noqa: E402
from mediclip_jax import parallel  # noqa: E402
from mediclip_jax.evaluate import scoring  # noqa: E402
from mediclip_jax.methods import latent_diffusion  # noqa: E402
from tests.device_checks import CompileCounter, host, max_diff  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/latent_diffusion.py[:arg], as launch/train.py "
                                          "takes it")
COMPARED, STEPS, N_EVAL = 3, 6, 11
COMPILES = CompileCounter()


def run(devices, config, dataset, workdir: str) -> dict:
  """STEPS steps on a mesh over `devices`: losses, parameters and EMA after COMPARED steps, step compilations."""
  mesh = parallel.make_mesh(devices)
  trainable = latent_diffusion.build(config, dataset, workdir, mesh, train=True)
  state = trainable.state
  before = host({k: state[k] for k in ("params", "ema")})
  losses, after = [], None
  COMPILES.clear()
  for step in range(STEPS):
    batch = {k: parallel.global_array(v, mesh) for k, v in trainable.local_batch(step).items()}
    state, m = trainable.train_step(state, batch)
    if step < COMPARED:
      losses.append(float(m["loss"]))
      assert bool(m["finite"]), step
    if step == COMPARED - 1:
      after = host({k: state[k] for k in ("params", "ema", "latent_norm")})
  jax.block_until_ready(state)
  return {"mesh": mesh, "trainable": trainable, "before": before, "after": after, "loss": np.array(losses),
          "compiles": dict(COMPILES)}


def main() -> int:
  flags.FLAGS(sys.argv)
  config = _CONFIG.value
  with tempfile.TemporaryDirectory(prefix="ld_md_") as tmp:
    make = oct_phantom.make_oct_phantom_dataset if config.data.phantom_kind == "oct" else phantom.make_phantom_dataset
    root = make(os.path.join(tmp, "data"), n_train=config.data.phantom_n_train, n_test_normal=1, n_test_abnormal=1,
                size=config.data.phantom_size, seed=config.seed)
    dataset = datasets.load_dataset(root)
    one = run(jax.devices()[:1], config, dataset, os.path.join(tmp, "w1"))
    eight = run(jax.devices(), config, dataset, os.path.join(tmp, "w8"))
    # Scoring: the 1-device run's state after COMPARED steps on both meshes; 11 images in batches of 5 (padded).
    images = np.asarray(one["trainable"].calibration_images)[:N_EVAL]
    scored = {}
    for name, res in (("1", one), ("8", eight)):
      state = parallel.replicate({"params": one["after"]["params"], "ema": one["after"]["ema"],
                                  "latent_norm": one["after"]["latent_norm"]}, res["mesh"])
      scored[name] = scoring.score_share(res["trainable"].scorer(state), images, 5, res["mesh"])
    (m1, s1), (m8, s8) = scored["1"], scored["8"]
  out = {"n_devices": len(jax.devices()), "batch_size": config.train.batch_size, "image_size": config.data.image_size,
         "augment": config.augment.preset, "noise": config.diffusion.noise,
         "loss_1": one["loss"].tolist(), "loss_8": eight["loss"].tolist(),
         "max_loss_diff": float(np.abs(one["loss"] - eight["loss"]).max()),
         "compiles_1": one["compiles"], "compiles_8": eight["compiles"], "steps": STEPS,
         "latent_norm_diff": max_diff(one["after"]["latent_norm"], eight["after"]["latent_norm"]),
         "eval_n": int(m8.shape[0]), "eval_map_diff": float(np.abs(m1 - m8).max()),
         "eval_score_diff": float(np.abs(s1 - s8).max()), "eval_score_spread": float(np.ptp(s1))}
  for part in ("params", "ema"):
    out[f"max_{part}_diff"] = max_diff(one["after"][part], eight["after"][part])
    out[f"{part}_change_1"] = max_diff(one["before"][part], one["after"][part])
    out[f"{part}_change_8"] = max_diff(eight["before"][part], eight["after"][part])
  print(json.dumps(out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
