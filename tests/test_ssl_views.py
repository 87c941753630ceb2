"""The SSL views T1, T2 (`synthesis.ssl_views`): keys and determinism, jit/vmap, identity when off,
every preset's output range, the OCT layer order, exact flips, the blur and Sobel filters against
scipy, and config errors.

Compilation dominates on CPU, so each test jits one program for several configs at once.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from mediclip_jax.synthesis import mix, ssl_views

S = 32  # image side
N_KEYS = 16
KEY = jax.random.key(0)


def _cfg(preset: str = "none", **values):
  cfg = ssl_views.default_config(preset)
  for name, value in values.items():
    cfg[name] = value
  return cfg


def _images(c: int) -> np.ndarray:
  """(3, S, S, c): a random image with exact 0s and 1s, dark top / bright bottom, constant 0.37."""
  rng = np.random.default_rng(c)
  noisy = rng.uniform(0.0, 1.0, (S, S, c))
  noisy[:4], noisy[-4:] = 0.0, 1.0
  half = np.zeros((S, S, c))
  half[S // 2:] = 1.0
  return np.stack([noisy, half, np.full((S, S, c), 0.37)]).astype(np.float32)


def _batched(views: dict, keys: jax.Array, image: jax.Array) -> dict:
  """Every view of `views` for every key, on one image: {name: (K, H, W, C)}."""
  return {n: jax.vmap(v, in_axes=(0, None))(keys, image) for n, v in views.items()}


@pytest.fixture(scope="module")
def preset_views() -> dict:
  """{(preset, C): (3 images, N_KEYS, S, S, C) views} with one compiled program per C."""
  views = {p: ssl_views.make_view(_cfg(p)) for p in ssl_views.PRESETS}
  keys = jax.random.split(KEY, N_KEYS)
  fn = jax.jit(jax.vmap(lambda im: _batched(views, keys, im)))
  out = {}
  for c in (1, 3):
    res = jax.device_get(fn(jnp.asarray(_images(c))))
    out.update({(p, c): res[p] for p in ssl_views.PRESETS})
  return out


def test_every_preset_keeps_shape_dtype_and_range(preset_views):
  for c in (1, 3):
    images = _images(c)
    for p in ssl_views.PRESETS:
      v = preset_views[p, c]
      assert v.shape == (3, N_KEYS, S, S, c) and v.dtype == np.float32, (p, c, v.shape, v.dtype)
      assert np.all(np.isfinite(v)) and v.min() >= 0.0 and v.max() <= 1.0, (p, c, v.min(), v.max())
      changed = np.abs(v[0] - images[0]).max()
      if p == "none":
        np.testing.assert_array_equal(v, np.broadcast_to(images[:, None], v.shape))
      else:
        assert changed > 0.05, (p, c, changed)


def test_oct_keeps_bright_part_at_the_bottom(preset_views):
  for c in (1, 3):
    v = preset_views["oct", c][1]  # dark top, bright bottom
    top, bottom = v[:, :S // 2].mean(axis=(1, 2, 3)), v[:, S // 2:].mean(axis=(1, 2, 3))
    assert np.all(bottom - top > 0.6), (c, bottom - top)
  # The check catches a vertical flip: with vflip_p = 1 every view is upside down.
  flipped = jax.jit(jax.vmap(ssl_views.make_view(_cfg("oct", vflip_p=1.0)), in_axes=(0, None)))(
      jax.random.split(KEY, N_KEYS), jnp.asarray(_images(1)[1]))
  flipped = np.asarray(flipped)
  assert np.all(flipped[:, S // 2:].mean(axis=(1, 2, 3)) < flipped[:, :S // 2].mean(axis=(1, 2, 3)))


def test_geometric_preserves_intensities(preset_views):
  for c in (1, 3):
    images = _images(c)
    const = preset_views["geometric", c][2]
    np.testing.assert_allclose(const, 0.37, atol=1e-6)  # pure geometry keeps a constant image constant
    v = preset_views["geometric", c][0]
    assert np.all(np.abs(v.mean(axis=(1, 2, 3)) - images[0].mean()) < 0.08)
    # Photometric views change a constant image (brightness), so the check above can fail.
    photo = preset_views["photometric", c][2]
    assert np.abs(photo - 0.37).max() > 0.05


def test_ablation_presets_nest():
  g, p, c = (ssl_views.preset_values(n) for n in ("geometric", "photometric", "cutout"))
  geometric_fields = ("hflip_p", "vflip_p", "rotate_deg", "crop_scale", "crop_ratio")
  assert all(g[f] == p[f] == c[f] for f in geometric_fields)
  assert all(v == 0.0 for f, v in g.items() if f not in geometric_fields)
  assert all(p[f] == c[f] for f in p if not f.startswith("cutout"))
  assert p["cutout_p"] == 0.0 and c["cutout_p"] > 0.0
  oct_ = ssl_views.preset_values("oct")
  assert oct_["vflip_p"] == 0 and oct_["rotate_deg"] <= 10 and oct_["cutout_p"] == 0 and oct_["contrast"] == 0
  assert oct_["gamma"] == 0


@functools.cache
def _cutout_fns():
  """(jitted view, jitted views) of the `cutout` preset (every operation but speckle), compiled once."""
  cfg = _cfg("cutout")
  return jax.jit(ssl_views.make_view(cfg)), jax.jit(ssl_views.make_views(cfg))


def _random_images(n: int, seed: int) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).uniform(0.0, 1.0, (n, S, S, 1)).astype(np.float32))


def test_deterministic_per_key():
  one, _ = _cutout_fns()
  image = _random_images(1, 1)[0]
  keys = jax.random.split(KEY, 2)
  a = one(keys[0], image)
  np.testing.assert_array_equal(a, one(keys[0], image))
  assert float(jnp.abs(one(keys[1], image) - a).max()) > 0.05


def test_make_views_equals_the_per_sample_loop_and_ignores_the_batch():
  one, views = _cutout_fns()
  images = _random_images(6, 2)
  a1, a2 = views(KEY, 3, images[:4], jnp.arange(4))
  np.testing.assert_array_equal(a1, views(KEY, 3, images[:4], jnp.arange(4))[0])
  # vmap over the batch equals the per-sample loop; sample i's keys are fold_in(mix.sample_keys(...)[i], 0 or 1).
  keys = mix.sample_keys(KEY, 3, jnp.arange(4))
  for i in range(4):
    np.testing.assert_allclose(one(jax.random.fold_in(keys[i], 0), images[i]), a1[i], atol=1e-5)
    np.testing.assert_allclose(one(jax.random.fold_in(keys[i], 1), images[i]), a2[i], atol=1e-5)
  order = np.array([2, 0, 5, 4])
  b1, b2 = views(KEY, 3, images[order], jnp.asarray(order))
  np.testing.assert_allclose(b1[:2], a1[np.array([2, 0])], atol=1e-6)  # independent of the rest of the batch
  np.testing.assert_allclose(b2[:2], a2[np.array([2, 0])], atol=1e-6)
  assert float(jnp.abs(a1 - a2).max(axis=(1, 2, 3)).min()) > 0.02  # the two views of a sample differ
  c1, _ = views(KEY, 4, images[:4], jnp.arange(4))
  assert float(jnp.abs(c1 - a1).max(axis=(1, 2, 3)).min()) > 0.02  # and change with the step


# One config per operation: strength zero (probability 1 where it has one) must be an exact identity,
# a non-zero strength must change the image.
OPS = {
    "hflip": ({}, {"hflip_p": 1.0}),
    "vflip": ({}, {"vflip_p": 1.0}),
    "rotate": ({}, {"rotate_deg": 30.0}),
    "crop": ({"crop_scale": (1.0, 1.0), "crop_ratio": (1.0, 1.0)}, {"crop_scale": (0.4, 0.5)}),
    "aspect": ({}, {"crop_ratio": (0.5, 0.6)}),
    "brightness": ({"brightness": 0.0}, {"brightness": 0.5}),
    "contrast": ({"contrast": 0.0}, {"contrast": 0.5}),
    "gamma": ({"gamma": 0.0}, {"gamma": 0.5}),
    "blur": ({"blur_p": 1.0, "blur_sigma": 0.0}, {"blur_p": 1.0, "blur_sigma": 1.5}),
    "edge": ({"edge_p": 1.0, "edge_strength": 0.0}, {"edge_p": 1.0, "edge_strength": 0.8}),
    "noise": ({"noise_std": 0.0}, {"noise_std": 0.2}),
    "speckle": ({"speckle_std": 0.0}, {"speckle_std": 0.3}),
    "cutout": ({"cutout_p": 1.0, "cutout_size": 0.0}, {"cutout_p": 1.0, "cutout_size": 0.3}),
}


def test_each_operation_is_identity_at_zero_and_active_otherwise():
  views = {}
  for name, (zero, on) in OPS.items():
    views[f"{name}/zero"] = ssl_views.make_view(_cfg("none", **zero))
    views[f"{name}/on"] = ssl_views.make_view(_cfg("none", **on))
  views["all_zero"] = ssl_views.make_view(_cfg("none", **{k: v for z, _ in OPS.values() for k, v in z.items()}))
  views["geometric"] = ssl_views.make_view(_cfg("geometric"))
  views["geometric+cutout"] = ssl_views.make_view(_cfg("geometric", cutout_p=1.0, cutout_size=0.3))
  views["geometric+speckle"] = ssl_views.make_view(_cfg("geometric", speckle_std=1e-4))
  image = jnp.asarray(np.random.default_rng(3).uniform(0.2, 0.8, (S, S, 3)).astype(np.float32))
  keys = jax.random.split(KEY, 4)
  out = jax.device_get(jax.jit(lambda: _batched(views, keys, image))())
  np.testing.assert_array_equal(out["all_zero"], np.broadcast_to(image, out["all_zero"].shape))
  for name in OPS:
    np.testing.assert_array_equal(out[f"{name}/zero"], np.broadcast_to(image, out["all_zero"].shape), err_msg=name)
    assert np.abs(out[f"{name}/on"] - np.asarray(image)).max(axis=(1, 2, 3)).min() > 1e-3, name
  # Draws do not depend on what else is enabled: adding cutout changes only the cut-out box.
  geo, cut = out["geometric"], out["geometric+cutout"]
  assert np.all((geo == cut) | (cut == 0.0)) and np.any(geo != cut)
  # nor when the noise fields are drawn too: the same geometry plus a tiny speckle.
  assert 0.0 < np.abs(out["geometric+speckle"] - geo).max() < 1e-2


def test_flips_are_exact_mirrors():
  image = jnp.asarray(np.random.default_rng(4).uniform(0.0, 1.0, (S, 24, 3)).astype(np.float32))  # not square
  cfgs = {"h": _cfg(hflip_p=1.0), "v": _cfg(vflip_p=1.0), "hv": _cfg(hflip_p=1.0, vflip_p=1.0)}
  out = jax.jit(lambda k: {n: ssl_views.make_view(c)(k, image) for n, c in cfgs.items()})(KEY)
  np.testing.assert_array_equal(out["h"], image[:, ::-1])
  np.testing.assert_array_equal(out["v"], image[::-1])
  np.testing.assert_array_equal(out["hv"], image[::-1, ::-1])


def test_blur_and_sobel_match_scipy():
  x = np.random.default_rng(5).uniform(0.0, 1.0, (S, 24, 2)).astype(np.float32)
  for sigma in (0.4, 1.0, 2.0):
    radius = ssl_views.blur_radius(2.0)
    got = np.asarray(ssl_views.gaussian_blur(jnp.asarray(x), jnp.float32(sigma), radius))
    for ch in range(2):
      ref = ndimage.gaussian_filter(x[..., ch].astype(np.float64), sigma, mode="reflect", truncate=radius / sigma)
      np.testing.assert_allclose(got[..., ch], ref, atol=1e-5)
  mag = np.asarray(ssl_views.sobel_magnitude(jnp.asarray(x)))
  x64 = x.astype(np.float64)
  ref = np.stack([np.hypot(ndimage.sobel(x64[..., ch], axis=0, mode="nearest"),
                           ndimage.sobel(x64[..., ch], axis=1, mode="nearest")) for ch in range(2)], axis=-1)
  np.testing.assert_allclose(mag, ref / ref.max(), atol=1e-5)


def test_blur_radius_must_fit_the_image():
  view = ssl_views.make_view(_cfg(blur_p=1.0, blur_sigma=4.0))  # radius 12
  with pytest.raises(ValueError, match=r"config\.ssl\.views\.blur_sigma"):
    jax.eval_shape(view, KEY, jax.ShapeDtypeStruct((8, 8, 1), jnp.float32))


def test_presets_and_overrides_resolve():
  cfg = ssl_views.default_config("oct")
  assert ssl_views.resolve(cfg)._asdict() == ssl_views.preset_values("oct")
  cfg.noise_std = 0  # an explicit number beats the preset, whatever the order
  cfg.preset = "fundus"
  want = dict(ssl_views.preset_values("fundus"), noise_std=0.0)
  assert ssl_views.resolve(cfg)._asdict() == want
  ssl_views.apply_preset(cfg, "grey")  # writes every number
  assert cfg.preset == "grey" and cfg.crop_scale == ssl_views.preset_values("grey")["crop_scale"]
  assert ssl_views.resolve(cfg)._asdict() == ssl_views.preset_values("grey")
  assert ssl_views.default_config().preset == ssl_views.DEFAULT_PRESET


@pytest.mark.parametrize("field,value", [
    ("hflip_p", 1.5), ("vflip_p", -0.1), ("blur_p", float("nan")), ("edge_p", 2.0), ("cutout_p", -1.0),
    ("rotate_deg", 200.0), ("rotate_deg", -1.0), ("crop_scale", (0.0, 1.0)), ("crop_scale", (0.9, 0.5)),
    ("crop_scale", (0.5, 1.2)), ("crop_scale", (0.5,)), ("crop_ratio", (0.0, 1.0)), ("crop_ratio", (2.0, 1.0)),
    ("brightness", 1.0), ("contrast", -0.1), ("gamma", -0.5), ("blur_sigma", -1.0), ("noise_std", -0.1),
    ("speckle_std", float("inf")), ("edge_strength", 1.5), ("cutout_size", 2.0),
])
def test_bad_values_name_the_field(field, value):
  cfg = _cfg("grey", **{field: value})
  with pytest.raises(ValueError, match=rf"config\.ssl\.views\.{field}"):
    ssl_views.validate_config(cfg)
  with pytest.raises(ValueError, match=rf"config\.ssl\.views\.{field}"):
    ssl_views.make_view(cfg)


def test_unknown_preset_names_the_choices():
  cfg = ssl_views.default_config()
  cfg.preset = "mri"
  for call in (functools.partial(ssl_views.validate_config, cfg), functools.partial(ssl_views.apply_preset, cfg, "mri"),
               functools.partial(ssl_views.default_config, "mri")):
    with pytest.raises(ValueError, match=r"config\.ssl\.views\.preset") as err:
      call()
    assert all(p in str(err.value) for p in ssl_views.PRESETS)
