"""MediCLIP's training losses on the anomaly map: focal (gamma 2) + dice, summed."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def focal_loss(prob_abnormal: jax.Array, mask: jax.Array, *, gamma: float = 2.0, truncate_labels: bool = True,
               smooth: float = 1e-5) -> jax.Array:
  """Mean focal loss of the 2-class map against the mask.

  As the reference: the "logits" are the softmax probabilities, the one-hot target is clamped to
  [smooth, 1 - smooth], p_t = <onehot, p> + smooth. `truncate_labels` reproduces the reference's
  `.long()` cast (a soft label below 1 becomes class 0); False uses the soft mask as the target.
  """
  p1 = prob_abnormal.astype(jnp.float32)
  y = mask.astype(jnp.float32)
  if truncate_labels:
    y = jnp.floor(y)
  t1 = jnp.clip(y, smooth, 1 - smooth)
  t0 = jnp.clip(1 - y, smooth, 1 - smooth)
  pt = t0 * (1 - p1) + t1 * p1 + smooth
  return jnp.mean(-((1 - pt) ** gamma) * jnp.log(pt))


def dice_loss(prob_abnormal: jax.Array, mask: jax.Array, smooth: float = 1.0) -> jax.Array:
  """1 - mean over images of (2 sum(p y) + s) / (sum p + sum y + s), on the float mask."""
  p = prob_abnormal.astype(jnp.float32).reshape(prob_abnormal.shape[0], -1)
  y = mask.astype(jnp.float32).reshape(mask.shape[0], -1)
  dice = (2 * jnp.sum(p * y, 1) + smooth) / (jnp.sum(p, 1) + jnp.sum(y, 1) + smooth)
  return 1 - jnp.mean(dice)


def mediclip_loss(prob_abnormal: jax.Array, mask: jax.Array, *, truncate_labels: bool = True,
                  gamma: float = 2.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(focal + dice, {"focal": ..., "dice": ...})."""
  f = focal_loss(prob_abnormal, mask, gamma=gamma, truncate_labels=truncate_labels)
  d = dice_loss(prob_abnormal, mask)
  return f + d, {"focal": f, "dice": d}
