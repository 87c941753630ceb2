"""MIRAGE: noise-robust image-text adaptation of the CLIP towers (stage 0 before few-shot MediCLIP).

Both towers are trained contrastively on (possibly noisy) medical image-text pairs with the MIRAGE loss
(`mirage_loss`: a soft nearest-neighbour caption from a FIFO bank of text embeddings estimates each pair's
cleanliness s, which weighs pair InfoNCE by 1 + s and a neighbour-robust InfoNCE by 1 - s, plus an
optimal-transport term) or plain CLIP InfoNCE (the baseline). One jitted step on the mesh: images and
tokens split over `data`, both towers per device, embeddings gathered over `data` for the global-batch
logits and the bank enqueue, AdamW with warm-up and cosine decay. The bank and its pointer live in the
train state (checkpointed, so a resumed run continues exactly).

What trains (`mirage.trainable`): the two projections; or also the last `mirage.train_blocks` blocks of
each tower with their final LayerNorms; or the full towers. An optional feature distillation keeps the
vision tower's tapped patch tokens near the original ones (MediCLIP reads them). The run ends by writing
the adapted towers as a CLIP checkpoint, `workdir/clip`, which `--config.model.clip.checkpoint=` loads.
"""
from __future__ import annotations

import functools
import math
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh
from sklearn.metrics import roc_auc_score

from data_pipelines import batches, pair_data
from mediclip_jax import parallel, rngs
from mediclip_jax.methods import mediclip, mirage_loss
from mediclip_jax.methods.base import Trainable, keep_finite
from mediclip_jax.models.clip import CLIP_MEAN, CLIP_STD, clip_from_config
from mediclip_jax.weights import clip_convert
from mediclip_jax.weights.params import flat_params
from mediclip_jax.weights.tokenizer import tokenizer_for

NAME = "mirage"
ANOMALY_DATASET = False  # image-text pairs (`data.pairs`), evaluated by `make_evaluator`
LOSSES = ("mirage", "infonce")
SCOPES = ("projections", "last_blocks", "full")
OT_COSTS = ("principled", "code")
SCALES = ("pcl", "rcl", "otc", "queue")
RECALL_AT = (1, 5, 10)


def default_config() -> ml_collections.ConfigDict:
  """MIRAGE's sections with the released recipe's loss settings (temperatures 0.07 / 0.9 / 0.07 / 0.07, weights
  1 / 0.2 / 0.05, AdamW lr 1e-4, weight decay 0.2, 10 % warm-up then cosine), a bank sized for small data sets."""
  c = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict()
  c.data.pairs = pair_data.default_config()
  c.model = ml_collections.ConfigDict()
  c.model.clip = mediclip.default_config().model.clip  # variant / checkpoint / act / tap_layers / dtype / init seed
  c.model.bpe_path = ml_collections.FieldReference(None, field_type=str)  # default: packaged vocabulary
  c.mirage = ml_collections.ConfigDict()
  c.mirage.loss = "mirage"               # mirage | infonce (the CLIP baseline)
  c.mirage.weights = ml_collections.ConfigDict({"pcl": 1.0, "rcl": 0.2, "otc": 0.05})
  c.mirage.temperatures = ml_collections.ConfigDict({"pcl": 0.07, "rcl": 0.9, "otc": 0.07, "queue": 0.07})
  c.mirage.learn_temperatures = True
  c.mirage.max_logit_scale = 100.0       # clamp of every exp(log scale); 0 = unclamped (the released code)
  c.mirage.ot_cost = "principled"        # principled: image->text cost -cos(t~_i, t_j) | code: as released
  c.mirage.sinkhorn_iters = 0            # 0: the released one-sided plan (row softmax); > 0: balanced Sinkhorn
  c.mirage.bank_size = 4096              # FIFO text memory; pre-filled from the training captions
  c.mirage.trainable = "last_blocks"     # projections | last_blocks | full
  c.mirage.train_blocks = 2              # last_blocks: blocks of each tower that train
  c.mirage.distill_weight = 0.0          # L2 between adapted and original tapped patch tokens (model.clip.tap_layers)
  c.train = ml_collections.ConfigDict()
  c.train.lr = 1e-4
  c.train.weight_decay = 0.2             # on matrices only (not biases, LayerNorms, embeddings' scales, temperatures)
  c.train.warmup_fraction = 0.1          # linear warm-up over this fraction of the steps, then cosine decay to 0
  c.train.b1 = 0.9
  c.train.b2 = 0.999
  c.train.eps = 1e-8
  c.train.grad_clip_norm = 0.0           # 0 = off
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the field for values MIRAGE cannot run with."""
  m = config.mirage
  pair_data.validate(config.data.pairs)
  checks = {"loss": (m.loss, LOSSES), "trainable": (m.trainable, SCOPES), "ot_cost": (m.ot_cost, OT_COSTS)}
  for name, (value, allowed) in checks.items():
    if value not in allowed:
      raise ValueError(f"config.mirage.{name} must be one of {allowed}, got {value!r}")
  for name in SCALES:
    if not m.temperatures[name] > 0:
      raise ValueError(f"config.mirage.temperatures.{name} must be > 0, got {m.temperatures[name]}")
  for name in ("pcl", "rcl", "otc"):
    if m.weights[name] < 0:
      raise ValueError(f"config.mirage.weights.{name} must be >= 0, got {m.weights[name]}")
  if m.max_logit_scale < 0:
    raise ValueError(f"config.mirage.max_logit_scale must be >= 0 (0 = unclamped), got {m.max_logit_scale}")
  if not isinstance(m.sinkhorn_iters, int) or m.sinkhorn_iters < 0:
    raise ValueError(f"config.mirage.sinkhorn_iters must be an integer >= 0, got {m.sinkhorn_iters!r}")
  if m.bank_size < config.train.batch_size:
    raise ValueError(f"config.mirage.bank_size ({m.bank_size}) must be at least the global batch "
                     f"(config.train.batch_size={config.train.batch_size})")
  if m.trainable == "last_blocks" and (not isinstance(m.train_blocks, int) or m.train_blocks < 1):
    raise ValueError(f"config.mirage.train_blocks must be a positive integer, got {m.train_blocks!r}")
  if m.distill_weight < 0:
    raise ValueError(f"config.mirage.distill_weight must be >= 0, got {m.distill_weight}")
  for name in ("lr", "eps"):
    if not config.train[name] > 0:
      raise ValueError(f"config.train.{name} must be > 0, got {config.train[name]}")
  if config.train.weight_decay < 0 or config.train.grad_clip_norm < 0:
    raise ValueError("config.train.weight_decay and config.train.grad_clip_norm must be >= 0")
  if not 0.0 <= config.train.warmup_fraction < 1.0:
    raise ValueError(f"config.train.warmup_fraction must lie in [0, 1), got {config.train.warmup_fraction}")
  if config.model.clip.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"config.model.clip.dtype must be float32 or bfloat16, got {config.model.clip.dtype!r}")


# ----------------------------------------------------------------------------------------------
# What trains, optimiser, state
# ----------------------------------------------------------------------------------------------

def trainable_filter(m: ml_collections.ConfigDict, vision_layers: int, text_layers: int):
  """An nnx filter selecting the parameters `m.trainable` adapts (never CLIP's own logit_scale: MIRAGE has four)."""
  def chosen(path, value) -> bool:
    if not isinstance(value, nnx.Param) or path[0] not in ("visual", "text"):
      return False
    if m.trainable == "full" or path[1] == "proj":
      return True
    if m.trainable == "last_blocks":
      if path[1] in ("ln_post", "ln_final"):
        return True
      layers = vision_layers if path[0] == "visual" else text_layers
      return path[1] == "blocks" and path[2] >= layers - m.train_blocks
    return False
  return chosen


def make_optimizer(t: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """AdamW, linear warm-up then cosine decay to 0; weight decay on matrices only."""
  warmup = int(round(t.warmup_fraction * total_steps))
  schedule = optax.warmup_cosine_decay_schedule(0.0, t.lr, warmup, max(total_steps, warmup + 1), end_value=0.0)
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
  opt = optax.adamw(schedule, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay, mask=decay_mask)
  if t.grad_clip_norm:
    opt = optax.chain(optax.clip_by_global_norm(t.grad_clip_norm), opt)
  return opt


def _max_scale(m) -> float | None:
  return float(m.max_logit_scale) or None


def _host(tree):
  """This process's copy of replicated arrays, as numpy (works in multi-process runs)."""
  return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), tree)


def make_train_step(graphdef, optimizer, mesh: Mesh, m: ml_collections.ConfigDict, taps: tuple[int, ...]):
  """Jitted `step(state, frozen, batch) -> (state, metrics)`, state donated, non-finite updates refused.

  frozen = {"model": the CLIP parameters that do not train, "initial": the trainable ones at step 0 (the
  distillation's teacher)}; batch = {"image" (B,H,W), "tokens" (B,T), "class_id" (B,), "noisy" (B,)} split over
  `data`. `class_id` and `noisy` only feed metrics (how often a batch holds same-class pairs, the false
  negatives InfoNCE pushes apart; s on injected vs clean pairs): the loss never reads them.
  """
  rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  distill = m.distill_weight > 0
  weights = (m.weights.pcl, m.weights.rcl, m.weights.otc)

  def loss_fn(params, frozen, bank, batch):
    x = mediclip.clip_input(batch["image"])
    model = nnx.merge(graphdef, params["clip"], frozen["model"])
    out = model.visual(x, taps if distill else ())
    # The global batch: embeddings gathered over `data` for the B x B logits and the enqueue.
    v = jax.lax.with_sharding_constraint(out.embedding.astype(jnp.float32), rep)
    t = jax.lax.with_sharding_constraint(model.text(batch["tokens"]).astype(jnp.float32), rep)
    scales = params["log_scales"] if m.learn_temperatures else jax.lax.stop_gradient(params["log_scales"])
    if m.loss == "mirage":
      total, aux = mirage_loss.mirage_loss(v, t, bank, scales, weights=weights, cost=m.ot_cost,
                                           sinkhorn_iters=m.sinkhorn_iters, max_scale=_max_scale(m))
    else:
      total, aux = mirage_loss.infonce_loss(v, t, scales["pcl"], max_scale=_max_scale(m))
    if distill:
      teacher = nnx.merge(graphdef, frozen["initial"], frozen["model"]).visual(x, taps).taps
      d = sum(jnp.mean(jnp.square(a[:, 1:].astype(jnp.float32) - jax.lax.stop_gradient(b[:, 1:]).astype(jnp.float32)))
              for a, b in zip(out.taps, teacher)) / len(taps)
      total = total + m.distill_weight * d
      aux = {**aux, "distill": d}
    return total, (aux, mirage_loss.normalize(t), v, t)

  def step(state, frozen, batch):
    (loss, (aux, t_norm, v, t)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], frozen, state["bank"], batch)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    bank, ptr = mirage_loss.enqueue(state["bank"], state["bank_ptr"], t_norm)
    cls, noisy = batch["class_id"], batch["noisy"].astype(jnp.float32)
    b = cls.shape[0]
    same = (cls[:, None] == cls[None, :]).astype(jnp.float32)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "update_norm": optax.tree.norm(updates),
               "fn_pair_fraction": (same.sum() - b) / (b * (b - 1)),
               **{f"tau_{k}": 1.0 / mirage_loss.logit_scale(params["log_scales"][k], _max_scale(m)) for k in SCALES},
               **{k: v_ for k, v_ in aux.items() if jnp.ndim(v_) == 0}}
    if "s" in aux:  # analysis only: s on the injected false positives vs the clean pairs of this batch
      s = aux["s"]
      metrics["s_noisy"] = jnp.sum(s * noisy) / jnp.maximum(noisy.sum(), 1.0)
      metrics["s_clean"] = jnp.sum(s * (1 - noisy)) / jnp.maximum((1 - noisy).sum(), 1.0)
    new = {**state, "step": state["step"] + 1, "params": params, "opt_state": opt_state, "bank": bank,
           "bank_ptr": ptr}
    return new, metrics

  return jax.jit(keep_finite(step), donate_argnums=0, in_shardings=(rep, rep, data), out_shardings=(rep, rep))


# ----------------------------------------------------------------------------------------------
# Embedding whole splits (evaluation, bank pre-fill)
# ----------------------------------------------------------------------------------------------

def _sharded_rows(x: np.ndarray, mesh: Mesh) -> jax.Array:
  """A host array every process holds in full, as a global array split over `data`."""
  sharding = parallel.batch_sharding(mesh)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def make_encoders(graphdef, mesh: Mesh):
  """(encode_images, encode_texts): params, frozen, host rows -> (N, D) normalised embeddings on every process,
  computed in batches of `batch` rows split over `data` (the last batch padded)."""
  rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)

  @functools.partial(jax.jit, in_shardings=(rep, rep, data), out_shardings=rep)
  def images_fn(params, frozen, x):
    out = nnx.merge(graphdef, params, frozen).visual(mediclip.clip_input(x))
    return mirage_loss.normalize(out.embedding.astype(jnp.float32))

  @functools.partial(jax.jit, in_shardings=(rep, rep, data), out_shardings=rep)
  def texts_fn(params, frozen, tokens):
    return mirage_loss.normalize(nnx.merge(graphdef, params, frozen).text(tokens).astype(jnp.float32))

  def batched(fn):
    def run(params, frozen, rows: np.ndarray, batch: int) -> np.ndarray:
      batch = -(-max(1, batch) // mesh.devices.size) * mesh.devices.size
      out = []
      for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        n = len(chunk)
        if n < batch:
          chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
        out.append(np.asarray(fn(params, frozen, _sharded_rows(chunk, mesh)))[:n])
      return np.concatenate(out)
    return run

  return batched(images_fn), batched(texts_fn)


def fill_bank(encode_texts, params, frozen, tokens: np.ndarray, size: int, seed: int, batch: int) -> np.ndarray:
  """The bank at step 0: training captions in shuffled order (epoch after epoch, as the released code's pre-fill
  pass, continued while the bank is larger than the training set), encoded by the initial text tower."""
  rng = np.random.default_rng(rngs.numpy_seed(seed, rngs.DATA))
  order = np.concatenate([rng.permutation(len(tokens)) for _ in range(-(-size // len(tokens)))])[:size]
  return encode_texts(params, frozen, tokens, batch)[order]


# ----------------------------------------------------------------------------------------------
# Evaluation: zero-shot classification, retrieval, noise detection
# ----------------------------------------------------------------------------------------------

def recall_at(sim: np.ndarray, match: np.ndarray, ks=RECALL_AT) -> dict[int, float]:
  """Fraction of queries (rows of `sim`) with a matching item (`match`, same shape) among their top k."""
  order = np.argsort(-sim, axis=1, kind="stable")
  hits = np.take_along_axis(match, order, axis=1)
  return {k: float(hits[:, :k].any(axis=1).mean()) for k in ks}


def _auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
  positive = np.asarray(positive, bool)
  if positive.all() or not positive.any():
    return None
  return float(roc_auc_score(positive, scores))


def make_evaluator(encoders, frozen_model, data: pair_data.PairSplits, tokens: dict, prompt_tokens,
                   m: ml_collections.ConfigDict, batch: int):
  """state -> metrics on the clean test split (zero-shot classification with the class prompt ensembles,
  image<->text retrieval; a retrieved caption counts when its text equals the query's own, so identical
  template captions are not counted as misses), the validation split's mean recall@1 (model selection),
  and how well s separates the injected false positives of the training split (AUROC of -s)."""
  encode_images, encode_texts = encoders
  n_prompts = [len(data.prompts[c]) for c in data.classes]

  def split_metrics(params, name: str, prefix: str = "") -> dict:
    v = encode_images(params, frozen_model, data.images[name], batch)
    t = encode_texts(params, frozen_model, tokens[name], batch)
    texts = np.asarray(data.texts[name])
    match = texts[:, None] == texts[None, :]
    sim = v @ t.T
    i2t, t2i = recall_at(sim, match), recall_at(sim.T, match)
    out = {f"{prefix}i2t_recall@{k}": i2t[k] for k in RECALL_AT}
    out.update({f"{prefix}t2i_recall@{k}": t2i[k] for k in RECALL_AT})
    out[f"{prefix}mean_recall@1"] = (i2t[1] + t2i[1]) / 2
    return out, v

  def evaluate(state) -> dict:
    params = state["params"]
    res, v = split_metrics(params["clip"], "test")
    prompts = encode_texts(params["clip"], frozen_model, prompt_tokens, batch)
    centres = np.stack([c.mean(0) for c in np.split(prompts, np.cumsum(n_prompts)[:-1])])
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    log_scales = _host(params["log_scales"])
    scale = float(mirage_loss.logit_scale(log_scales["pcl"], _max_scale(m)))
    logits = scale * v @ centres.T
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    labels = data.labels["test"]
    res["zeroshot_auroc"] = _auroc(1.0 - p[:, 0], labels > 0)
    res["zeroshot_accuracy"] = float(np.mean(p.argmax(1) == labels))
    res.update(split_metrics(params["clip"], "val", "val_")[0])
    if data.noisy.any():
      v_train = encode_images(params["clip"], frozen_model, data.images["train"], batch)
      t_train = encode_texts(params["clip"], frozen_model, tokens["train"], batch)
      scale_q = mirage_loss.logit_scale(log_scales["queue"], _max_scale(m))
      near = np.asarray(mirage_loss.soft_neighbours(jnp.asarray(v_train), jnp.asarray(_host(state["bank"])), scale_q))
      s = np.sum(t_train * near, axis=1)
      res["noise_auroc"] = _auroc(-s, data.noisy)
      res["s_noisy_mean"], res["s_clean_mean"] = float(s[data.noisy].mean()), float(s[~data.noisy].mean())
    return res

  return evaluate


# ----------------------------------------------------------------------------------------------
# The chain: the adapted towers as a CLIP checkpoint
# ----------------------------------------------------------------------------------------------

def make_finish(graphdef, frozen_model, config: ml_collections.ConfigDict, data: pair_data.PairSplits):
  """state, workdir -> {"clip_checkpoint": dir[, "heldout_dataset": dir]}: writes the adapted CLIP (both towers;
  its logit_scale the learned pair temperature) in our checkpoint format, the training config in its metadata.
  Written to a temporary folder first and moved into place, so a failure leaves no half checkpoint. For captions
  of a MediCLIP-layout dataset, also the dataset restricted to the validation and test pairs' images
  (`pair_data.write_heldout_listing`): where a detector on these towers is evaluated without leakage."""
  def finish(state, workdir: str) -> dict:
    params = _host(state["params"])
    model = nnx.merge(graphdef, params["clip"], _host(frozen_model))
    flat = flat_params(model)
    flat["logit_scale"] = np.asarray(min(float(params["log_scales"]["pcl"]),
                                         math.log(_max_scale(config.mirage) or math.inf)), np.float32)
    out = os.path.join(workdir, "clip")
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    meta = {"method": NAME, "step": str(int(_host(state["step"]))),
            "training_config": config.to_json_best_effort()}
    clip_convert.write_clip_checkpoint(tmp, model.cfg.to_dict(), flat, metadata=meta)
    if os.path.isdir(out):
      shutil.rmtree(out)
    os.replace(tmp, out)
    outputs = {"clip_checkpoint": out}
    if config.data.pairs.source in ("busi_captions", "brainmri_captions"):
      heldout = os.path.join(workdir, "heldout_dataset")
      if not os.path.isdir(heldout):
        pair_data.write_heldout_listing(config.data.pairs.dataset_root, set(data.names["val"] + data.names["test"]),
                                        heldout)
      outputs["heldout_dataset"] = heldout
    return outputs
  return finish


# ----------------------------------------------------------------------------------------------
# build
# ----------------------------------------------------------------------------------------------

def build(config: ml_collections.ConfigDict, dataset, workdir: str, mesh: Mesh, *, train: bool = True) -> Trainable:
  """MIRAGE as a `Trainable` on `mesh`: pairs from `data.pairs` (the anomaly `dataset` is not used)."""
  del dataset
  validate(config)
  m, seed, size, bs = config.mirage, int(config.seed), int(config.data.image_size), int(config.train.batch_size)
  data = pair_data.open_pairs(config.data.pairs, size, workdir, seed)
  n_train = len(data.texts["train"])
  clip = clip_from_config(mediclip.backbone_section(config.model.clip))
  tok = tokenizer_for(config.model.clip.checkpoint, config.model.bpe_path)
  ctx = clip.cfg.context_length
  tokens = {name: tok(data.texts[name], ctx) for name in pair_data.SPLITS}
  prompt_tokens = tok([p for c in data.classes for p in data.prompts[c]], ctx)
  taps = tuple(config.model.clip.tap_layers) or mediclip.default_taps(clip.cfg.vision_layers)
  graphdef, params, frozen_model = nnx.split(
      clip, trainable_filter(m, clip.cfg.vision_layers, clip.cfg.text_layers), ...)
  spe = batches.steps_per_epoch(n_train, bs)
  total = int(config.train.epochs) * spe
  optimizer = make_optimizer(config.train, total)
  log_scales = {k: jnp.asarray(math.log(1.0 / m.temperatures[k]), jnp.float32) for k in SCALES}
  all_params = {"clip": params, "log_scales": log_scales}
  frozen_model = parallel.replicate(frozen_model, mesh)
  params_dev = parallel.replicate(params, mesh)
  encoders = make_encoders(graphdef, mesh)  # one compilation each, for the pre-fill and every evaluation
  bank = fill_bank(encoders[1], params_dev, frozen_model, tokens["train"], int(m.bank_size), seed,
                   int(config.eval.batch_size))
  state = parallel.replicate({"step": jnp.zeros((), jnp.int32), "params": all_params,
                              "opt_state": optimizer.init(all_params), "bank": bank,
                              "bank_ptr": jnp.zeros((), jnp.int32)}, mesh)

  train_step = None
  if train:
    step = make_train_step(graphdef, optimizer, mesh, m, taps)
    frozen = {"model": frozen_model, "initial": params_dev if m.distill_weight > 0 else {}}
    train_step = lambda state, batch: step(state, frozen, batch)

  sl = batches.process_slice(bs)
  class_ids, noisy = data.labels["train"].astype(np.int32), data.noisy

  def local_batch(step: int) -> dict[str, np.ndarray]:
    rows = batches.epoch_batch(step, n_train, bs, seed)[0][sl]
    return {"image": data.images["train"][rows], "tokens": tokens["train"][rows], "class_id": class_ids[rows],
            "noisy": noisy[rows]}

  arch = clip.cfg
  bank_bytes = int(m.bank_size) * arch.embed_dim * 4
  counts = {name: len(data.texts[name]) for name in pair_data.SPLITS}
  n_trainable = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  n_total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(clip, nnx.Param)))
  notes = [f"pairs: {data.pairs_file}; {counts['train']} train / {counts['val']} val / {counts['test']} test; "
           f"{int(noisy.sum())} training captions replaced (false positives, fp_rate {config.data.pairs.fp_rate}); "
           f"classes {data.classes}",
           f"loss: {m.loss}; trains {m.trainable} ({n_trainable:,} of {n_total:,} parameters); bank "
           f"{m.bank_size} x {arch.embed_dim} ({bank_bytes / 2**20:.1f} MiB float32)",
           f"backbone: CLIP ViT {arch.vision_width}w x {arch.vision_layers} layers, patch {arch.patch_size}; weights: "
           + (config.model.clip.checkpoint or "NONE")]
  if not config.model.clip.checkpoint:
    notes.append("WARNING: the CLIP towers start from random init (no model.clip.checkpoint): the numbers test the "
                 "pipeline and the loss's behaviour on these pairs, not a pretrained CLIP's adaptation.")
  if int(m.bank_size) > n_train:
    notes.append(f"the bank ({m.bank_size}) is larger than the training captions ({n_train}): pre-filled entries "
                 "repeat until the first pass of training replaces them")
  info = {"notes": notes, "pairs": {"file": data.pairs_file, "counts": counts, "classes": list(data.classes),
                                    "injected_false_positives": int(noisy.sum())},
          "bank": {"size": int(m.bank_size), "dim": arch.embed_dim, "bytes": bank_bytes},
          "trainable_parameters": n_trainable,
          "preprocessing": {"image_size": size, "color": "grey", "clip_mean": list(CLIP_MEAN),
                            "clip_std": list(CLIP_STD), "resize": "PIL bilinear"},
          "backbone": {"architecture": arch.to_dict(),
                       "weights": config.model.clip.checkpoint or "random init (no checkpoint given)"}}
  evaluate = make_evaluator(encoders, frozen_model, data, tokens, prompt_tokens, m, int(config.eval.batch_size))
  return Trainable(state=state, train_step=train_step, local_batch=local_batch, steps_per_epoch=spe, scorer=None,
                   calibration_images=None, threshold=None, info=info, evaluate=evaluate,
                   select_key="val_mean_recall@1", finish=make_finish(graphdef, frozen_model, config, data))
