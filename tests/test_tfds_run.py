"""Training and evaluation on a TFDS build (data.source="tfds") and on streamed training images
(data.train_stream): the same numbers as the files, and a run killed mid-epoch resumes with exactly the
batches it would have seen."""
from __future__ import annotations

import json
import os
import signal
import types

import numpy as np
import pytest

from configs import brainmri, chestxray
from mediclip_jax import methods
from mediclip_jax.train import loop

pytestmark = pytest.mark.slow  # tiny training runs in process


@pytest.fixture(scope="module")
def brainmri_tfds(shared_dir, tmp_path_factory):
  from data_pipelines import tfds_builders
  out = tmp_path_factory.mktemp("tfds")
  result = tfds_builders.build(tfds_builders.AnomalyDataset(shared_dir / "data" / "brainmri", data_dir=out,
                                                            name="brainmri", progress=False))
  return result.directory


def _brainmri(shared_dir, **over):
  c = brainmri.get_config("tiny,shot=4")
  c.data.root = str(shared_dir / "data" / "brainmri")
  c.data.image_size, c.train.epochs, c.train.batch_size, c.eval.every_epochs = 64, 1, 2, 1
  c.eval.batch_size, c.eval.figures = 16, False
  for k, v in over.items():
    section, field = k.split(".")
    c[section][field] = v
  return c


def test_mediclip_on_the_tfds_build_streamed_gives_the_files_metrics(shared_dir, brainmri_tfds, tmp_path):
  """Same seed, same support set (drawn from the same names), same pixels through the same transforms: the
  TFDS build (records in hash order), streamed at every evaluation by 2 grain workers, gives the metrics of
  the files held in memory, the untrained row too (BrainMRI has no masks: image metrics, exact; streamed
  pixel metrics against the exact ones: tests/test_streaming_metrics.py)."""
  method = methods.get("mediclip")
  files = loop.train_and_evaluate(_brainmri(shared_dir), str(tmp_path / "files"), method)
  tfds = loop.train_and_evaluate(_brainmri(shared_dir, **{"data.source": "tfds", "data.tfds_dir": brainmri_tfds,
                                                           "eval.streaming": True, "data.workers": 2}),
                                 str(tmp_path / "tfds"), method)
  for row in ("untrained", "last_epoch"):
    assert files[row].keys() == tfds[row].keys() and "image_auroc" in files[row]
    for k, v in files[row].items():
      assert tfds[row][k] == v, (row, k)
  assert files["decision"] == tfds["decision"]
  support = [json.loads((tmp_path / d / "support_set.json").read_text())["files"] for d in ("files", "tfds")]
  assert support[0] == support[1] and len(support[0]) == 4


def _phantom_stream(workers=0):
  c = chestxray.get_config("phantom,tiny,shot=4")
  c.data.train_stream, c.data.workers = True, workers
  c.data.image_size = c.data.phantom_size = 64
  c.data.phantom_n_test = 4
  c.train.batch_size, c.train.epochs = 4, 2  # 16 phantom training images: 4 steps per epoch
  c.train.checkpoint_every_steps, c.eval.every_epochs, c.eval.batch_size, c.eval.figures = 100, 100, 8, False
  return c


def _recording(log: list, sigterm_after: int | None = None):
  """MediCLIP whose batches are recorded (step -> images, sample indices), optionally sending SIGTERM to
  this process after the batch of step `sigterm_after` is drawn."""
  real = methods.get("mediclip")

  def build(config, dataset, workdir, mesh, *, train=True):
    t = real.build(config, dataset, workdir, mesh, train=train)
    draw = t.local_batch

    def local_batch(step):
      b = draw(step)
      log.append((step, b["image"].copy(), b["sample_index"].copy()))
      if step == sigterm_after:
        os.kill(os.getpid(), signal.SIGTERM)
      return b
    t.local_batch = local_batch
    return t
  return types.SimpleNamespace(NAME=real.NAME, default_config=real.default_config, validate=real.validate,
                               build=build)


def test_streamed_training_killed_mid_epoch_resumes_with_the_next_batch(tmp_path):
  """SIGTERM at step 3 of a 4-step epoch: the checkpoint holds the iterator's position, the resumed run
  (with 2 decoding workers instead of none) draws exactly the batches of steps 3.. of the uninterrupted run,
  across the epoch boundary, and ends with the same parameters."""
  whole: list = []
  results = loop.train_and_evaluate(_phantom_stream(), str(tmp_path / "whole"), _recording(whole), dump_params=True)
  assert results["steps"] == 8 and [s for s, _, _ in whole] == list(range(8))
  # Every training image once per epoch (16 images, batches of 4), in a new order each epoch.
  epochs = [[im.tobytes() for s, imgs, _ in whole if s // 4 == e for im in imgs] for e in (0, 1)]
  assert len(set(epochs[0])) == 16 and set(epochs[0]) == set(epochs[1]) and epochs[0] != epochs[1]
  assert np.array_equal(np.concatenate([idx for _, _, idx in whole]), np.arange(32))  # per-sample key ids

  part: list = []
  wd = str(tmp_path / "part")
  with pytest.raises(loop.Interrupted) as stop:
    loop.train_and_evaluate(_phantom_stream(), wd, _recording(part, sigterm_after=2))
  assert stop.value.step == 3
  resumed: list = []
  loop.train_and_evaluate(_phantom_stream(workers=2), wd, _recording(resumed), dump_params=True)
  assert [s for s, _, _ in resumed] == list(range(3, 8))
  for (s, img, idx), (s2, img2, idx2) in zip(whole[3:], resumed):
    assert s == s2 and np.array_equal(idx, idx2) and np.array_equal(img, img2), s
  a, b = (np.load(os.path.join(d, "params_process0.npz")) for d in (tmp_path / "whole", wd))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
