"""SIGTERM while the test set is scored: the evaluation stops between two batches, the run checkpoints
(or, before any training, saves nothing), and a resumed run evaluates the interrupted step first."""
from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

from configs import chestxray
from mediclip_jax import checkpoints, methods
from mediclip_jax.evaluate import scoring
from mediclip_jax.train import loop

pytestmark = pytest.mark.slow  # two tiny training runs in process, ~40 s


def _config():
  c = chestxray.get_config("phantom,tiny")
  c.train.epochs, c.train.checkpoint_every_steps, c.eval.every_epochs = 2, 100, 1
  c.data.phantom_n_test, c.data.phantom_size, c.data.image_size, c.eval.batch_size = 4, 64, 64, 2
  c.eval.figures = False
  return c


def _sigterm_in_evaluation_at(steps, monkeypatch):
  """Patches scoring so that evaluating the given steps' state sends SIGTERM after the first batch."""
  real = scoring.evaluate
  calls = []

  def evaluate(score_batch, test, eval_cfg, mesh, threshold=None, progress=None, **kwargs):
    calls.append(len(calls))

    def tick(n):
      if calls[-1] in steps:
        os.kill(os.getpid(), signal.SIGTERM)
      progress(n)
    return real(score_batch, test, eval_cfg, mesh, threshold, tick, **kwargs)
  monkeypatch.setattr(scoring, "evaluate", evaluate)


def _evals(wd):
  lines = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
  return [l["step"] for l in lines if "eval/image_auroc" in l]


def test_sigterm_during_an_evaluation(tmp_path, monkeypatch):
  method = methods.get("mediclip")
  # Before any training (the untrained evaluation): nothing saved, the failed start leaves nothing.
  _sigterm_in_evaluation_at({0}, monkeypatch)
  with pytest.raises(loop.Interrupted, match="nothing trained") as e:
    loop.train_and_evaluate(_config(), str(tmp_path / "a"), method)
  assert e.value.step == 0 and not (tmp_path / "a").exists()
  # Mid-run: evaluations are 0 (untrained), then after steps 2 and 4 (2 steps per epoch); stop in the second.
  _sigterm_in_evaluation_at({1}, monkeypatch)
  wd = tmp_path / "b"
  with pytest.raises(loop.Interrupted) as e:
    loop.train_and_evaluate(_config(), str(wd), method)
  ckpt = checkpoints.Checkpointer(str(wd / "checkpoints"))
  meta = ckpt.restore_metadata(2)
  assert e.value.step == 2 and ckpt.latest_step() == 2 and meta["eval_pending"] is True
  assert meta["threshold"] is None and meta["normalization"] is None  # no calibration on the way out
  ckpt.close()
  assert _evals(wd) == [0]
  monkeypatch.undo()
  results = loop.train_and_evaluate(_config(), str(wd), method)
  assert _evals(wd) == [0, 2, 4]  # the interrupted evaluation first, then the rest of the run
  assert results["steps"] == 4 and np.isfinite(results["last_epoch"]["image_auroc"])
  ckpt = checkpoints.Checkpointer(str(wd / "checkpoints"))
  meta = ckpt.restore_metadata(4)
  ckpt.close()
  assert meta["threshold"] == results["decision"]["threshold"] and meta["normalization"]["low"] is not None
