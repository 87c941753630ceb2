"""Run as a script with 8 fake CPU devices: a method that trains on in-memory phantoms (SSL-AnoVAE, the latent
diffusion baseline), built through its module's `build` on a 1-device and on an 8-device mesh, takes the same
steps (per-device random draws keyed by step and global sample index) and scores the same maps; its step
compiles once per mesh.

  python tests/method_multidevice.py --config configs/ssl_anovae.py:oct_phantom,tiny,views=photometric \
      --config.data.image_size=32 --config.model.image_size=32 --config.train.batch_size=8

takes launch/train.py's config flags (the train tests pass their training run's); the training phantoms are
generated as `data.phantom` would (kind, count, size and seed). Compilations are counted over the steps only
(`device_checks.CompileCounter`). Prints one JSON line: per compared state part its 1-vs-8 difference and its
change over the steps, every scalar train metric's largest 1-vs-8 difference, the compilations and the scoring
differences; tests/processes.py:assert_one_vs_eight checks them.
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
from mediclip_jax import methods, parallel  # noqa: E402
from mediclip_jax.evaluate import scoring  # noqa: E402
from tests.device_checks import CompileCounter, host, max_diff  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "a method's config file[:arg], as launch/train.py takes it")
COMPARED, STEPS, N_EVAL = 3, 6, 11
# The state parts compared between the meshes (the optimiser states follow from them).
PARTS = {"ssl_anovae": ("params", "disc", "target"), "latent_diffusion": ("params", "ema", "latent_norm")}
MAKERS = {"chest": phantom.make_phantom_dataset, "oct": oct_phantom.make_oct_phantom_dataset}
COMPILES = CompileCounter()


def run(devices, config, dataset, workdir: str) -> dict:
  """STEPS steps on a mesh over `devices`: scalar metrics of the first COMPARED, the state after them, compilations."""
  mesh = parallel.make_mesh(devices)
  trainable = methods.get(config.method).build(config, dataset, workdir, mesh, train=True)
  state = trainable.state
  before, metrics, after = host(state), [], None
  COMPILES.clear()
  for step in range(STEPS):
    batch = {k: parallel.global_array(v, mesh) for k, v in trainable.local_batch(step).items()}
    state, m = trainable.train_step(state, batch)
    if step < COMPARED:
      assert bool(m["finite"]), step
      metrics.append({k: float(v) for k, v in m.items() if k != "finite"})
    if step == COMPARED - 1:
      after = host(state)
  jax.block_until_ready(state)
  return {"mesh": mesh, "trainable": trainable, "before": before, "after": after, "metrics": metrics,
          "compiles": dict(COMPILES)}


def main() -> int:
  flags.FLAGS(sys.argv)
  config = _CONFIG.value
  with tempfile.TemporaryDirectory(prefix="method_md_") as tmp:  # the phantoms the launcher generates for `config`
    root = MAKERS[config.data.phantom_kind](os.path.join(tmp, "data"), n_train=config.data.phantom_n_train,
                                            n_test_normal=1, n_test_abnormal=1, size=config.data.phantom_size,
                                            seed=config.seed)
    dataset = datasets.load_dataset(root)
    one = run(jax.devices()[:1], config, dataset, os.path.join(tmp, "w1"))
    eight = run(jax.devices(), config, dataset, os.path.join(tmp, "w8"))
    # Scoring: the 1-device run's state after COMPARED steps on both meshes; 11 images in batches of 5 (padded to 8).
    images = np.asarray(one["trainable"].calibration_images)[:N_EVAL]
    scored = {}
    for name, res in (("1", one), ("8", eight)):
      state = parallel.replicate(one["after"], res["mesh"])
      scored[name] = scoring.score_share(res["trainable"].scorer(state), images, 5, res["mesh"])
    (m1, s1), (m8, s8) = scored["1"], scored["8"]
  out = {"method": config.method, "config": config.to_dict(), "n_devices": len(jax.devices()), "steps": STEPS,
         "loss_1": [m["loss"] for m in one["metrics"]], "loss_8": [m["loss"] for m in eight["metrics"]],
         "max_metric_diff": {k: max(abs(a[k] - b[k]) for a, b in zip(one["metrics"], eight["metrics"]))
                             for k in one["metrics"][0]},
         "compiles_1": one["compiles"], "compiles_8": eight["compiles"],
         "eval_n": int(m8.shape[0]), "eval_map_diff": float(np.abs(m1 - m8).max()),
         "eval_score_diff": float(np.abs(s1 - s8).max()), "eval_score_spread": float(np.ptp(s1))}
  for part in PARTS[config.method]:
    out[f"max_{part}_diff"] = max_diff(one["after"][part], eight["after"][part])
    out[f"{part}_change_1"] = max_diff(one["before"][part], one["after"][part])
    out[f"{part}_change_8"] = max_diff(eight["before"][part], eight["after"][part])
  print(json.dumps(out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
