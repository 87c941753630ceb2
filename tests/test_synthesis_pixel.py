"""Pixel-space synthesis on real BrainMRI and BUSI images, through the one entry point `mix.build_synthesis`
(the function the train step runs): task choice, mask statistics against the reference, split invariance,
dispatch equivalence, foreground placement; and two building blocks (Gaussian filter, Poisson blending
against OpenCV).

Run with `pytest -s` to see the printed figures (task frequencies, mask fractions, Poisson PSNR).
"""
from __future__ import annotations

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import normal_images
from mediclip_jax.synthesis import mix, pixel, shapes

CHUNK = 64  # samples per call: one compiled shape serves every test of a config
N_STATS = 4032  # 63 chunks: about 1,000 samples per pixel task at the default 0.25 each
# Mean positive-pixel fraction per task of the PyTorch reference implementation (mid-points of
# the ranges measured on BrainMRI and BUSI at 224²).
REF_FRACTION = {"cutpaste": 0.063, "gauss_intensity": 0.1565, "deformation": 0.088}
ANOMALY_TASKS = ("cutpaste", "gauss_intensity", "deformation")
KEY = jax.random.key(7)


@pytest.fixture(scope="module")
def brain(shared_dir) -> np.ndarray:
  return normal_images.load_normal_images(shared_dir / "data" / "brainmri", 224, 16)[0]


@pytest.fixture(scope="module")
def busi(shared_dir) -> np.ndarray:
  return normal_images.load_normal_images(shared_dir / "data" / "busi", 224, 16)[0]


def _build(cfg, support: np.ndarray):
  """(jitted synthesize, pools) of the entry point for `cfg` on `support`."""
  synthesize, make_pools = mix.build_synthesis(cfg)
  return jax.jit(synthesize), make_pools(support)


# tests/conftest.py compiles at XLA backend (LLVM) level 0, right for programs that run a few times. A program
# that runs over many chunks is execution-bound: it compiles at the default level 2 (the same HLO, and the same
# results, the code generated optimised). The stats fixture's 63 chunks: 34.4 -> about 17 CPU s.
RUN_OPTIMISED = {"xla_backend_optimization_level": 2}


def _run(synth, images: np.ndarray, index: np.ndarray, step: int = 0,
         optimised: bool = False) -> dict[str, np.ndarray]:
  """The entry point over `images` in chunks of CHUNK samples, outputs as numpy."""
  fn, pools = synth
  assert len(images) % CHUNK == 0
  if optimised:
    fn = fn.lower(KEY, step, jnp.asarray(images[:CHUNK]), jnp.asarray(index[:CHUNK], jnp.int32), pools).compile(
        RUN_OPTIMISED)
  outs = [jax.device_get(fn(KEY, step, jnp.asarray(images[i:i + CHUNK]), jnp.asarray(index[i:i + CHUNK], jnp.int32),
                            pools)) for i in range(0, len(images), CHUNK)]
  return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def _probs(**probs: float):
  cfg = mix.default_config()
  for t in mix.TASKS:
    cfg.probs[t] = probs.get(t, 0.0)
  return cfg


@pytest.fixture(scope="module")
def default_synth(brain):
  """The default config (the four pixel tasks at 0.25, auto dispatch) with the BrainMRI support set."""
  return _build(mix.default_config(), brain)


@pytest.fixture(scope="module")
def mixed_batch(brain, busi):
  """CHUNK images cycled from both datasets and their global sample indices."""
  images = np.concatenate([brain, busi])
  return images[np.arange(CHUNK) % len(images)], np.arange(1000, 1000 + CHUNK)


def test_entry_point_split_invariance_determinism_identity(default_synth, mixed_batch):
  """A sample's result depends only on (key, step, global index): permuting the batch permutes the results;
  the same call gives the same results, another step others; identity samples come back unchanged."""
  images, index = mixed_batch
  a = _run(default_synth, images, index)
  perm = np.random.default_rng(0).permutation(CHUNK)
  b = _run(default_synth, images[perm], index[perm])
  for k in ("image", "mask", "task"):
    np.testing.assert_allclose(b[k], a[k][perm], atol=1e-6)
  again = _run(default_synth, images, index)
  for k in ("image", "mask", "task"):
    np.testing.assert_array_equal(again[k], a[k])
  other = _run(default_synth, images, index, step=1)
  assert np.mean(np.abs(other["image"] - a["image"]).reshape(CHUNK, -1).max(1) > 0) > 0.5
  assert a["task"].dtype == np.int32 and set(a["task"].tolist()) == set(range(len(mix.PIXEL_TASKS)))
  ident = a["task"] == mix.TASKS.index("identity")
  np.testing.assert_array_equal(a["image"][ident], images[ident])
  assert not a["mask"][ident].any()
  assert a["image"].min() >= 0.0 and a["image"].max() <= 1.0


@pytest.fixture(scope="module")
def stats(brain, busi, default_synth):
  """N_STATS samples of the default config over both datasets' images: (outputs, source images)."""
  images = np.concatenate([brain, busi])
  src = images[np.arange(N_STATS) % len(images)]
  return _run(default_synth, src, np.arange(N_STATS), optimised=True), src


@pytest.mark.slow
def test_task_frequencies_and_identity(stats):
  """The task table draws each pixel task with probability 0.25; identity samples are the input, maskless."""
  out, src = stats
  freq = np.bincount(out["task"], minlength=len(mix.TASKS)) / N_STATS
  print(f"\ntask frequencies over {N_STATS} samples: {dict(zip(mix.TASKS, np.round(freq, 4).tolist()))}")
  np.testing.assert_allclose(freq[:len(mix.PIXEL_TASKS)], 0.25, atol=0.03)
  assert freq[len(mix.PIXEL_TASKS):].sum() == 0
  ident = out["task"] == mix.TASKS.index("identity")
  np.testing.assert_array_equal(out["image"][ident], src[ident])
  assert not out["mask"][ident].any()


@pytest.mark.slow
@pytest.mark.parametrize("name", ANOMALY_TASKS)
def test_task_mask_statistics(stats, name):
  """Over the ~1,000 samples of the task: mean mask fraction within 25 % of the reference's; binary masks;
  the image unchanged outside the mask, in [0, 1], and changed (with a non-empty mask) in almost every sample."""
  out, src = stats
  sel = out["task"] == mix.TASKS.index(name)
  n = int(sel.sum())
  assert n >= 900
  image, mask, orig = out["image"][sel], out["mask"][sel], src[sel]
  frac = float(mask.mean())
  print(f"\n{name}: mean positive-pixel fraction {frac:.4f} over {n} samples (reference ≈ {REF_FRACTION[name]})")
  assert abs(frac - REF_FRACTION[name]) <= 0.25 * REF_FRACTION[name]
  assert set(np.unique(mask)) <= {0.0, 1.0}
  np.testing.assert_array_equal(image[mask == 0], orig[mask == 0])
  assert image.min() >= 0.0 and image.max() <= 1.0
  nonempty = mask.reshape(n, -1).max(1) > 0
  changed = np.abs(image - orig).reshape(n, -1).max(1) > 0
  if name == "cutpaste":
    # The label is where the image changed; pasting black background onto black background (anywhere
    # placement, as the reference) changes nothing, so a few labels are legitimately empty.
    print(f"cutpaste: {100 * (1 - nonempty.mean()):.1f} % empty labels (image unchanged there)")
    np.testing.assert_array_equal(nonempty, changed)
    assert nonempty.mean() >= 0.97
  else:
    assert np.all(nonempty), "every anomalous sample must have a non-empty mask"
    assert changed.mean() > 0.95, "the image must actually change in (almost) every sample"


@pytest.mark.slow
def test_dispatch_switch_equals_map(brain, default_synth, mixed_batch):
  """vmapped lax.switch ("switch", for accelerators) and one-by-one lax.map ("map", for CPU) agree: the same
  tasks and masks, images up to float reassociation (a few 1e-5 in the Gaussian-filtered textures)."""
  images, index = mixed_batch
  cfg = mix.default_config()
  assert mix.resolve_dispatch(cfg.dispatch) == "map"  # on CPU
  cfg.dispatch = "switch"
  a = _run(default_synth, images, index)
  b = _run(_build(cfg, brain), images, index)
  np.testing.assert_array_equal(b["task"], a["task"])
  np.testing.assert_allclose(b["image"], a["image"], atol=1e-4)
  np.testing.assert_array_equal(b["mask"], a["mask"])


@pytest.mark.slow
def test_foreground_only(brain):
  """With foreground_only, every anomaly's mask is non-empty and lies inside the body region."""
  cfg = _probs(cutpaste=1 / 3, gauss_intensity=1 / 3, deformation=1 / 3)
  cfg.pixel.shapes.foreground_only = True
  src = brain[np.arange(CHUNK) % len(brain)]
  out = _run(_build(cfg, brain), src, np.arange(CHUNK))
  fg = np.asarray(shapes.foreground_mask(jnp.asarray(src), cfg.pixel.shapes))
  for name in ANOMALY_TASKS:
    sel = out["task"] == mix.TASKS.index(name)
    assert sel.sum() >= 8, name
    assert np.all(out["mask"][sel].reshape(int(sel.sum()), -1).max(1) > 0), name
    assert not np.any((out["mask"][sel] > 0) & ~fg[sel]), f"{name}: mask outside the foreground"


def test_identity(brain):
  img = jnp.asarray(brain[0])
  out, mask = pixel.identity(jax.random.key(0), img, pixel.default_config())
  np.testing.assert_array_equal(np.asarray(out), brain[0])
  assert not np.any(np.asarray(mask))


def test_gaussian_filter_matches_scipy():
  from scipy import ndimage as ndi  # pylint: disable=import-outside-toplevel
  x = np.random.default_rng(0).random((40, 52)).astype(np.float32)
  blur = jax.jit(lambda v, s: pixel.gaussian_filter(v, s, 4.0))  # σ traced: one compilation for both
  for s in (1.3, 4.0):
    np.testing.assert_allclose(np.asarray(blur(jnp.asarray(x), jnp.float32(s))),
                               ndi.gaussian_filter(x.astype(np.float64), s), atol=1e-5)


@pytest.mark.slow
def test_poisson_matches_opencv_seamless_clone(brain, busi):
  """Poisson blending of a warped support region into 20 real targets vs cv2.seamlessClone(NORMAL_CLONE):
  mean PSNR over the mask >= 30 dB; the windowed solve equals the whole-image one."""
  cfg = pixel.default_config()
  hw = brain.shape[1:]
  win = shapes.size_bounds(0.2, 0.6, hw)[1]
  yy, xx = shapes.pixel_grid(hw)
  pairs = [(brain, i, (i + 5) % 16) for i in range(10)] + [(busi, i, (i + 3) % 16) for i in range(10)]
  n = len(pairs)
  tgts = jnp.asarray(np.stack([d[a] for d, a, _ in pairs]))
  srcs = jnp.asarray(np.stack([d[b] for d, _, b in pairs]))

  def make(k, tgt, src):
    k1, k2, k3 = jax.random.split(k, 3)
    shape = shapes.sample_perlin_shape(k1, hw, 0.2, 0.6, cfg.shapes)
    corner = jnp.floor(jax.random.uniform(k2, (2,)) * (jnp.array(hw, jnp.float32) - shape.size - 4.0)) + 2.0
    m = shapes.perlin_mask(shape, yy - corner[0], xx - corner[1])
    vals = pixel.warp_region(*jax.random.split(k3, 4), shape.size, yy - corner[0], xx - corner[1], src, cfg.cutpaste)
    vals = jnp.round(jnp.clip(vals, 0, 1) * 255) / 255
    return m, vals, pixel.poisson_blend(tgt, vals, m, 3), pixel.poisson_blend(tgt, vals, m, 3, window=win)

  keys = jax.random.split(jax.random.key(11), n)
  masks, vals, ours, windowed = jax.device_get(jax.jit(jax.vmap(make))(keys, tgts, srcs))
  np.testing.assert_allclose(windowed, ours, atol=2e-5)
  psnrs = []
  for i in range(n):
    m8 = masks[i].astype(np.uint8) * 255
    ys, xs = np.nonzero(m8)
    # OpenCV puts the mask's bounding box (width w) at x = centre.x - w // 2: this centre keeps it in place.
    centre = (int(xs.min() + (xs.max() - xs.min() + 1) // 2), int(ys.min() + (ys.max() - ys.min() + 1) // 2))
    to8 = lambda a: cv2.cvtColor(np.round(np.clip(a, 0, 1) * 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
    ref = cv2.seamlessClone(to8(vals[i]), to8(np.asarray(tgts[i])), m8, centre, cv2.NORMAL_CLONE)[..., 0] / 255.0
    mine = np.clip(ours[i], 0, 1)
    mse = float(np.mean((mine - ref)[masks[i]] ** 2))
    psnrs.append(10 * np.log10(1.0 / max(mse, 1e-12)))
  print(f"\nPoisson vs OpenCV seamlessClone: mean PSNR {np.mean(psnrs):.2f} dB over {n} pairs "
        f"(min {np.min(psnrs):.2f}, max {np.max(psnrs):.2f})")
  assert n >= 20
  assert np.mean(psnrs) >= 30.0
  # The cut-paste task in Poisson mode: labelled where changed, exact elsewhere, values in range.
  cfg.cutpaste.paste_mode = "poisson"
  out, label = jax.device_get(jax.jit(jax.vmap(lambda k, im: pixel.cutpaste(k, im, srcs, cfg)))(keys[:8], tgts[:8]))
  orig = np.asarray(tgts[:8])
  np.testing.assert_array_equal(out[label == 0], orig[label == 0])
  assert out.min() >= 0.0 and out.max() <= 1.0
  assert np.all(label.reshape(8, -1).max(1) > 0) and np.all(np.abs(out - orig).reshape(8, -1).max(1) > 0)


def test_config_errors_name_the_field():
  cfg = mix.default_config()
  cfg.probs.cutpaste = 0.5
  with pytest.raises(ValueError, match="sum to 1"):
    mix.build_synthesis(cfg)
  cfg = mix.default_config()
  cfg.probs.blur = 0.0
  with pytest.raises(ValueError, match=r"unknown task names \['blur'\]"):
    mix.build_synthesis(cfg)
  cfg = mix.default_config()
  cfg.pixel.cutpaste.paste_mode = "soft"
  with pytest.raises(ValueError, match="paste_mode"):
    mix.build_synthesis(cfg)
  cfg = mix.default_config()
  cfg.dispatch = "vmap"
  with pytest.raises(ValueError, match="synthesis.dispatch"):
    mix.build_synthesis(cfg)
  with pytest.raises(ValueError, match="no VAE was given"):
    mix.build_synthesis(_probs(identity=0.5, latent_shuffle=0.5))
