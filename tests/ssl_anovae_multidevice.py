"""Run as a script with 8 fake CPU devices: SSL-AnoVAE built through `ssl_anovae.build` on a 1-device and
on an 8-device mesh takes the same steps (views and noise drawn per device, adversarial term on) and scores
the same maps; its step compiles once per mesh.

  python tests/ssl_anovae_multidevice.py --config configs/ssl_anovae.py:oct_phantom,tiny,views=photometric \
      --config.data.image_size=32 --config.model.image_size=32 --config.train.batch_size=8

takes launch/train.py's config flags: tests/test_ssl_anovae_train.py passes its training run's, so the
equivalence is checked on the configuration the launcher tests train (training phantoms generated as
`data.phantom` would: same count, size and seed).

Compilations are counted with a `jax.monitoring` listener on JAX's backend-compile event (it fires for
every executable XLA builds or loads from the persistent cache, named after the jitted function), over
the steps only: the Trainable hands out a lambda around the jitted step, so its cache is not reachable
without poking into the closure. Prints one JSON line; tests/test_ssl_anovae_train.py asserts on it.
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

from data_pipelines import datasets, oct_phantom  # noqa: E402
from mediclip_jax import parallel  # noqa: E402
from mediclip_jax.evaluate import scoring  # noqa: E402
from mediclip_jax.methods import ssl_anovae  # noqa: E402
from tests.device_checks import CompileCounter, host, max_diff  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/ssl_anovae.py[:arg], as launch/train.py takes it")
COMPARED, STEPS, N_EVAL = 3, 6, 11
COMPILES = CompileCounter()


def run(devices, config, dataset, workdir: str) -> dict:
  """STEPS steps on a mesh over `devices`: losses, state after COMPARED steps, compilations of the steps."""
  mesh = parallel.make_mesh(devices)
  trainable = ssl_anovae.build(config, dataset, workdir, mesh, train=True)
  state = trainable.state
  before = host({k: state[k] for k in ("params", "disc", "target")})
  losses, discs, after = [], [], None
  COMPILES.clear()
  for step in range(STEPS):
    batch = {k: parallel.global_array(v, mesh) for k, v in trainable.local_batch(step).items()}
    state, m = trainable.train_step(state, batch)
    if step < COMPARED:
      losses.append(float(m["loss"]))
      discs.append(float(m["disc"]))
      assert bool(m["finite"]), step
    if step == COMPARED - 1:
      after = host({k: state[k] for k in ("params", "disc", "target")})
  jax.block_until_ready(state)
  compiles = dict(COMPILES)
  return {"mesh": mesh, "trainable": trainable, "before": before, "after": after, "loss": np.array(losses),
          "disc": np.array(discs), "compiles": compiles}


def main() -> int:
  flags.FLAGS(sys.argv)
  config = _CONFIG.value
  with tempfile.TemporaryDirectory(prefix="ssl_md_") as tmp:  # the phantoms the launcher generates for `config`
    root = oct_phantom.make_oct_phantom_dataset(os.path.join(tmp, "data"), n_train=config.data.phantom_n_train,
                                                n_test_normal=1, n_test_abnormal=1, size=config.data.phantom_size,
                                                seed=config.seed)
    dataset = datasets.load_dataset(root)
    one = run(jax.devices()[:1], config, dataset, os.path.join(tmp, "w1"))
    eight = run(jax.devices(), config, dataset, os.path.join(tmp, "w8"))
    # Scoring: the 1-device run's trained state on both meshes; 11 images in batches of 5 (padded to 8).
    images = np.stack([np.asarray(x) for x in one["trainable"].calibration_images])[:N_EVAL]
    trained = {"params": one["after"]["params"]}
    scored = {}
    for name, res in (("1", one), ("8", eight)):
      state = parallel.replicate(trained, res["mesh"])
      scored[name] = scoring.score_share(res["trainable"].scorer(state), images, 5, res["mesh"])
    (m1, s1), (m8, s8) = scored["1"], scored["8"]
  out = {"n_devices": len(jax.devices()), "batch_size": config.train.batch_size, "adv": config.loss.adv,
         "views": config.ssl.views.preset, "image_size": config.data.image_size,
         "loss_1": one["loss"].tolist(), "loss_8": eight["loss"].tolist(),
         "max_loss_diff": float(np.abs(one["loss"] - eight["loss"]).max()),
         "max_disc_loss_diff": float(np.abs(one["disc"] - eight["disc"]).max()),
         "compiles_1": one["compiles"], "compiles_8": eight["compiles"], "steps": STEPS,
         "eval_n": int(m8.shape[0]), "eval_map_diff": float(np.abs(m1 - m8).max()),
         "eval_score_diff": float(np.abs(s1 - s8).max()), "eval_score_spread": float(np.ptp(s1))}
  for part in ("params", "disc", "target"):
    out[f"max_{part}_diff"] = max_diff(one["after"][part], eight["after"][part])
    out[f"{part}_change_1"] = max_diff(one["before"][part], one["after"][part])
    out[f"{part}_change_8"] = max_diff(eight["before"][part], eight["after"][part])
  print(json.dumps(out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
