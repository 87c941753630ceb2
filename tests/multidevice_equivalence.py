"""Run as a script with 8 fake CPU devices: the same 3 steps on 1 device and on 8 devices, and
the same evaluation maps from one device and from a batch split over 8 (`evaluate.scoring.score_share`).

Prints one JSON line with the largest differences; tests/test_parallel.py asserts on it.
"""
import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from mediclip_jax.models.clip import create_clip, get_variant  # noqa: E402
from mediclip_jax.models.mediclip import MediCLIP  # noqa: E402
from mediclip_jax.evaluate import scoring  # noqa: E402
from mediclip_jax.methods import mediclip as step_lib  # noqa: E402
from mediclip_jax.parallel import global_array, local_rows, make_mesh, replicate  # noqa: E402
from mediclip_jax.synthesis import mix  # noqa: E402
from mediclip_jax.weights.tokenizer import tokenizer_for  # noqa: E402

SIZE, STEPS, BATCH = 64, 3, 8


def run(devices, support):
  model = MediCLIP(create_clip(get_variant("tiny"), seed=0), tokenizer_for(), tap_layers=(2, 3, 4),
                   rngs=nnx.Rngs(1))
  graphdef, params, frozen_model = step_lib.split_model(model)
  mesh = make_mesh(devices)
  cfg = mix.default_config()
  synth, make_pools = mix.build_synthesis(cfg)
  opt = step_lib.make_optimizer(ml_collections.ConfigDict({"lr": 1e-3, "b1": 0.5, "b2": 0.999, "eps": 1e-8,
                                                           "grad_clip_norm": 0.0}))
  train_step = step_lib.make_train_step(graphdef, opt, synth, mesh,
                                        ml_collections.ConfigDict({"truncate_labels": True, "focal_gamma": 2.0}))
  frozen = replicate({"model": frozen_model, "pools": make_pools(support), "support": support}, mesh)
  state = replicate(step_lib.init_state(params, opt, 7), mesh)
  losses = []
  for s in range(STEPS + 7):
    idx = np.arange(s * BATCH, (s + 1) * BATCH, dtype=np.int32)
    batch = {"support_index": global_array(idx % len(support), mesh), "sample_index": global_array(idx, mesh)}
    state, m = train_step(state, frozen, batch)
    if s < STEPS:
      losses.append(float(m["loss"]))
      if s == STEPS - 1:
        params_after = jax.tree.map(np.asarray, state["params"])
  return np.array(losses), params_after, train_step._cache_size()  # pylint: disable=protected-access


def eval_diff(support) -> dict:
  """Largest map/score difference between unsharded and 8-way sharded prediction of 11 images (batch 5 -> 8)."""
  model = MediCLIP(create_clip(get_variant("tiny"), seed=0), tokenizer_for(), tap_layers=(2, 3, 4),
                   rngs=nnx.Rngs(1))
  graphdef, params, frozen_model = step_lib.split_model(model)
  images = np.concatenate([support, support, support[:3]])
  scores = {}
  for name, mesh in (("1", make_mesh(jax.devices()[:1])), ("8", make_mesh())):
    scorer = step_lib.make_scorer(graphdef, replicate(frozen_model, mesh), mesh)
    scores[name] = scoring.score_share(scorer({"params": replicate(params, mesh)}), images, 5, mesh)
  (m1, s1), (m8, s8) = scores["1"], scores["8"]
  mesh = make_mesh()
  x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  return {"eval_map_diff": float(np.abs(m1 - m8).max()), "eval_score_diff": float(np.abs(s1 - s8).max()),
          "eval_n": int(m8.shape[0]), "local_rows_roundtrip": bool((local_rows(global_array(x, mesh)) == x).all())}


def main():
  rng = np.random.default_rng(0)
  support = rng.uniform(0.1, 0.9, size=(4, SIZE, SIZE)).astype(np.float32)
  l1, p1, c1 = run(jax.devices()[:1], support)
  l8, p8, c8 = run(jax.devices(), support)
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), p1, p8))
  scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(p1))
  print(json.dumps({"n_devices": len(jax.devices()), "loss_1": l1.tolist(), "loss_8": l8.tolist(),
                    "max_loss_diff": float(np.abs(l1 - l8).max()), "max_param_diff": max(diffs),
                    "param_scale": scale, "compiles_1": c1, "compiles_8": c8, **eval_diff(support)}))


if __name__ == "__main__":
  sys.exit(main())
