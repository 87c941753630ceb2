"""Run as a script with 8 fake CPU devices: MIRAGE's loss, its gradients (w.r.t. v, t and the log scales)
and the bank update, jitted on a global batch sharded over 8 devices and over 1 device.

Cases: cost "principled" with the one-sided plan and with 30 Sinkhorn iterations, cost "code". Prints one
JSON line of the largest differences; tests/test_mirage_loss.py asserts on it.
"""
from __future__ import annotations

import json
import math
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from mediclip_jax import parallel  # noqa: E402
from mediclip_jax.methods import mirage_loss as ml  # noqa: E402

B, D, K = 32, 64, 256
CASES = [("principled", 0), ("principled", 30), ("code", 0)]


def _inputs():
  rng = np.random.default_rng(0)
  v = rng.normal(size=(B, D)).astype(np.float32)
  t = (v + rng.normal(size=(B, D))).astype(np.float32)
  bank = np.asarray(ml.normalize(rng.normal(size=(K, D)).astype(np.float32)))
  scales = {k: np.float32(math.log(1 / tau)) for k, tau in
            (("pcl", 0.07), ("rcl", 0.9), ("otc", 0.07), ("queue", 0.07))}
  return v, t, bank, scales


def run(devices) -> tuple[dict, bool]:
  mesh = parallel.make_mesh(devices)
  v, t, bank, scales = _inputs()
  gv, gt = parallel.global_array(v, mesh), parallel.global_array(t, mesh)
  bank_r, scales_r = parallel.replicate(bank, mesh), parallel.replicate(scales, mesh)
  sharded = len(gv.sharding.device_set) == len(devices) and gv.addressable_shards[0].data.shape[0] == B // len(devices)

  @jax.jit
  def everything(v_, t_, s_, bank_):
    """Every case's forward loss and value_and_grad w.r.t. (v, t, log scales), and the bank update: one
    compilation per mesh."""
    out = {}
    for cost, iters in CASES:
      def loss(v2, t2, s2, cost=cost, iters=iters):
        return ml.mirage_loss(v2, t2, bank_, s2, cost=cost, sinkhorn_iters=iters)
      total, aux = loss(v_, t_, s_)
      (total_g, _), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(v_, t_, s_)
      out[f"{cost}/{iters}"] = {"total": total, "total_g": total_g, "aux": aux, "grads": grads}
    new_bank, ptr = ml.enqueue(bank_, np.int32(K - 8), t_)  # wraps: rows 248..255 then 0..23
    out["enqueue"] = {"bank": new_bank, "ptr": ptr}
    return out

  out = jax.tree.map(np.asarray, everything(gv, gt, scales_r, bank_r))
  out["enqueue"]["ptr"] = int(out["enqueue"]["ptr"])
  return out, sharded


def _rel(a, b) -> float:
  return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30))


def main():
  one, _ = run(jax.devices()[:1])
  eight, sharded = run(jax.devices())
  res = {"n_devices": len(jax.devices()), "sharded_inputs": bool(sharded), "cases": len(CASES),
         "max_rel_loss_diff": 0.0, "max_rel_grad_diff": 0.0, "max_aux_diff": 0.0, "totals": {}}
  for case in (f"{c}/{i}" for c, i in CASES):
    a, b = one[case], eight[case]
    res["totals"][case] = float(a["total"])
    res["max_rel_loss_diff"] = max(res["max_rel_loss_diff"], _rel(a["total"], b["total"]),
                                   _rel(a["total_g"], b["total_g"]))
    res["max_rel_grad_diff"] = max([res["max_rel_grad_diff"]] + [
        _rel(x, y) for x, y in zip(jax.tree.leaves(a["grads"]), jax.tree.leaves(b["grads"]))])
    res["max_aux_diff"] = max([res["max_aux_diff"]] + [
        float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a["aux"]), jax.tree.leaves(b["aux"]))])
  res["bank_diff"] = float(np.abs(one["enqueue"]["bank"] - eight["enqueue"]["bank"]).max())
  res["ptr_equal"] = one["enqueue"]["ptr"] == eight["enqueue"]["ptr"] == (K - 8 + B) % K
  print(json.dumps(res))


if __name__ == "__main__":
  sys.exit(main())
