"""Learnable CoOp prompts for the "normal" / "abnormal" states (MediCLIP's prompt learner).

Each state word gets its own `n_ctx` learnable context vectors (class-specific context) placed
in front of the word: "<sot> v1 … v8 <word> . <eot> <pad>…". The frozen token embeddings of
everything but the context come from the CLIP text tower at call time, so no copy of them is
stored. Text features are the per-class mean of the projected EOT features, L2-normalised.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mediclip_jax.models.clip import TextTower
from mediclip_jax.weights.tokenizer import Tokenizer

NORMAL_WORDS = ("normal", "healthy", "negative", "unremarkable", "clear", "asymptomatic", "normal findings",
                "no findings", "in good health", "no evidence of disease")
ABNORMAL_WORDS = ("abnormal", "positive", "symptomatic", "disease", "lesion", "pathological", "impaired",
                  "evidence of disease", "abnormal finding", "pathological condition", "pathological abnormality")


class PromptLearner(nnx.Module):
  """Class-specific learnable contexts; `__call__(text_tower)` gives T: (embed_dim, n_classes)."""

  def __init__(self, tokenizer: Tokenizer, text_width: int, class_words: Sequence[Sequence[str]], *,
               n_ctx: int = 8, init_std: float = 0.02, causal_mask: bool = False, rngs: nnx.Rngs):
    if n_ctx < 1:
      raise ValueError(f"prompts.n_ctx must be >= 1, got {n_ctx}")
    self.n_ctx, self.causal_mask = n_ctx, causal_mask
    self.n_classes = len(class_words)
    words = [w for ws in class_words for w in ws]
    # "X" placeholders tokenise to one token each; the learned vectors replace them.
    ids = tokenizer([" ".join(["X"] * n_ctx) + f" {w}." for w in words])
    x_id = tokenizer.encode("X")
    if len(x_id) != 1 or not (ids[:, 1:1 + n_ctx] == x_id[0]).all():
      raise ValueError("prompt placeholder 'X' did not tokenise to one token per context slot")
    self.token_ids = nnx.Variable(jnp.asarray(ids))  # fixed, not trained
    self.class_of_prompt = tuple(c for c, ws in enumerate(class_words) for _ in ws)
    self.ctx = nnx.Param(init_std * jax.random.normal(rngs.params(), (len(words), n_ctx, text_width), jnp.float32))

  def __call__(self, text: TextTower) -> jax.Array:
    ids = self.token_ids[...]
    emb = text.embed_tokens(ids)
    emb = emb.at[:, 1:1 + self.n_ctx].set(self.ctx[...].astype(emb.dtype))
    feats = text.encode_embeddings(emb, jnp.argmax(ids, axis=-1), causal=self.causal_mask).astype(jnp.float32)
    onehot = jnp.asarray(np.eye(self.n_classes, dtype=np.float32)[list(self.class_of_prompt)])  # (N, C)
    mean = (onehot.T @ feats) / onehot.sum(0)[:, None]  # (C, E): mean of unnormalised features
    mean = mean / jnp.linalg.norm(mean, axis=-1, keepdims=True)
    return mean.T
