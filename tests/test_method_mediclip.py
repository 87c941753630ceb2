"""MediCLIP as a method: the train step synthesises exactly what the synthesis entry point returns,
and the presets feed test images to CLIP in RGB (reference) or grey (improved)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import datasets, run_data
from mediclip_jax import config_defaults, parallel, rngs
from mediclip_jax.methods import mediclip as mc
from mediclip_jax.models import vae as vae_lib
from mediclip_jax.synthesis import mix

COLOURED = "test/abnormal/image_204.jpg"  # BrainMRI test image whose RGB channels differ by up to 172 levels


def _config(shared_dir, latent: bool):
  c = config_defaults.mediclip_config("reference", "tiny")
  c.data.root = str(shared_dir / "data" / "brainmri")
  c.data.image_size = 64
  c.data.k_shot = 8
  if latent:
    config_defaults.use_latent_tasks(c, str(shared_dir / "weights" / "taef2"))
    c.train.batch_size = 16  # a batch that draws latent tasks too (they have 20 % of the table)
  return c


@pytest.mark.slow
@pytest.mark.parametrize("latent", [False, True])
def test_train_step_synthesises_what_the_entry_point_returns(shared_dir, tmp_path, monkeypatch, latent):
  """For the same key and step, the images and masks the step trains on equal `mix.build_synthesis`'s."""
  c = _config(shared_dir, latent)
  captured = {}

  def capture(graphdef, optimizer, train_cfg, state, frozen_model, images, masks):
    captured["traced"] = True
    return state, {"image": images, "mask": masks, "loss": jnp.zeros(())}  # a step's metrics hold its loss

  monkeypatch.setattr(mc, "update_on_batch", capture)
  mesh = parallel.make_mesh()
  dataset = datasets.load_dataset(c.data.root)
  trainable = mc.build(c, dataset, str(tmp_path), mesh, train=True)
  step = 3
  for _ in range(step):  # advance the state's step counter as training would
    trainable.state = {**trainable.state, "step": trainable.state["step"] + 1}
  local = trainable.local_batch(step)
  batch = {k: parallel.global_array(v, mesh) for k, v in local.items()}
  _, got = trainable.train_step(trainable.state, batch)
  assert captured["traced"]

  codec = vae_lib.codec(vae_lib.load_vae(c.vae)) if latent else None
  synthesize, make_pools = mix.build_synthesis(c.synthesis, codec)
  support = trainable.calibration_images
  want = jax.jit(synthesize)(rngs.stream(c.seed, rngs.SYNTHESIS), jnp.int32(step),
                             support[local["support_index"]], local["sample_index"], make_pools(support))
  np.testing.assert_array_equal(np.asarray(got["image"]), np.asarray(want["image"]))
  np.testing.assert_array_equal(np.asarray(got["mask"]), np.asarray(want["mask"]))
  assert np.asarray(want["mask"]).any()  # anomalies were synthesised, not just identities
  tasks = np.asarray(want["task"])
  assert ((tasks >= len(mix.PIXEL_TASKS)).any() if latent else (tasks < len(mix.PIXEL_TASKS)).all()), tasks


def test_model_init_and_synthesis_never_share_a_key():
  init, synth, data = (rngs.stream(100, n) for n in (rngs.INIT, rngs.SYNTHESIS, rngs.DATA))
  keys = [np.asarray(jax.random.key_data(k)) for k in (init, synth, data, jax.random.key(100))]
  assert len({k.tobytes() for k in keys}) == 4
  # Adding a stream leaves the others unchanged (derived by name, not by position).
  assert np.array_equal(np.asarray(jax.random.key_data(rngs.stream(100, rngs.SYNTHESIS))), keys[1])


def test_reference_feeds_rgb_test_images_and_improved_grey(shared_dir):
  """The reference preset scores the colour the released images carry; improved removes it."""
  ref = _config(shared_dir, False)
  imp = config_defaults.mediclip_config("improved", "tiny")
  imp.data.root, imp.data.image_size = ref.data.root, ref.data.image_size
  dataset = datasets.load_dataset(ref.data.root)
  i = [s.name for s in dataset.test].index(COLOURED)
  rgb = run_data.test_set(dataset, ref.data).arrays()[0]
  grey = run_data.test_set(dataset, imp.data).arrays()[0]
  assert rgb.shape[1:] == (64, 64, 3) and grey.shape[1:] == (64, 64)
  assert np.abs(rgb[i, ..., 0] - rgb[i, ..., 1]).max() > 0.3  # the channels differ
  assert ref.eval.every_epochs == 1 and imp.eval.every_epochs == 10
  # The colour reaches CLIP: the same detector scores the RGB image and its grey version differently.
  mesh = parallel.make_mesh()
  trainable = mc.build(ref, None, "", mesh, train=False)
  score = trainable.scorer(trainable.state)
  pad = lambda x: np.concatenate([x[None]] * jax.device_count())
  m_rgb, _ = score(parallel.global_array(pad(rgb[i]), mesh))
  m_grey, _ = score(parallel.global_array(pad(grey[i]), mesh))
  assert np.abs(np.asarray(m_rgb) - np.asarray(m_grey)).max() > 1e-4
