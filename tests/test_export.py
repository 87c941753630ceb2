"""Export (mediclip_jax.export, launch/export.py) and the JAX-free ONNX path of launch/predict.py.

A tiny MediCLIP run is trained on a subset of BUSI (the real images, a short sample list), exported
to ONNX and to jax.export, and both artefacts score real BUSI test images as the JAX scorer does:
maps within MAPS_ATOL = 1e-4 and raw scores within SCORES_ATOL = 1e-5 (mediclip_jax.export; measured
differences are ~1e-7, float32 round-off). `launch/predict.py --onnx` then runs in a process where
importing jax, jaxlib, flax or orbax raises ImportError, and writes the same normalised scores.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from tests.conftest import REPO

N_TEST = 8  # 4 normal + 4 abnormal BUSI test images
TRAIN = ["--config.data.image_size=64", "--config.train.epochs=2", "--config.data.k_shot=4",
         "--config.train.batch_size=4", "--config.eval.every_epochs=2", "--config.eval.batch_size=8"]
# Normalised scores are (raw - threshold) / (threshold - low) / 2 + 0.5: raw differences of ~1e-7 grow by
# 0.5 / (threshold - low) (~25x for this run), still far below this.
NORMALISED_ATOL = 1e-4


def _env():
  # Cache every compiled program (conftest's session cache): export and the reference then load the
  # random-init programs that building the model compiles (~50 small ones) instead of compiling them again.
  return dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def _busi_subset(shared_dir: Path, root: Path) -> Path:
  """A MediCLIP-layout dataset in `root`: BUSI's own image folder (linked, not copied), short sample lists."""
  busi = shared_dir / "data" / "busi"
  (root / "samples").mkdir(parents=True)
  os.symlink(busi / "images", root / "images")
  train = (busi / "samples" / "train.json").read_text().splitlines()[:8]
  test = [json.loads(l) for l in (busi / "samples" / "test.json").read_text().splitlines()]
  test = [t for t in test if t["label"] == 0][:N_TEST // 2] + [t for t in test if t["label"] == 1][:N_TEST // 2]
  (root / "samples" / "train.json").write_text("\n".join(train) + "\n")
  (root / "samples" / "test.json").write_text("\n".join(json.dumps(t) for t in test) + "\n")
  return root


def _run(args: list[str], timeout: int = 600, **kw) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *args], cwd=REPO, env=_env(), capture_output=True, text=True,
                        timeout=timeout, **kw)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, shared_dir):
  """(workdir, export dir, launch/export.py's stdout) of a tiny BUSI run exported in both formats."""
  for mod in ("onnx", "onnxruntime", "onnx_ir", "jax2onnx", "flatbuffers"):
    pytest.importorskip(mod)
  tmp = tmp_path_factory.mktemp("export")
  data, wd, out = _busi_subset(shared_dir, tmp / "busi"), tmp / "run", tmp / "run" / "export"
  train = _run(["launch/train.py", "--config", "configs/busi.py:tiny", "--workdir", str(wd),
                f"--config.data.root={data}", *TRAIN])
  assert train.returncode == 0, train.stderr[-4000:]
  exp = _run(["launch/export.py", "--workdir", str(wd), "--check_images", str(N_TEST)])
  assert exp.returncode == 0, (exp.stdout[-2000:], exp.stderr[-4000:])
  return wd, out, exp.stdout


@pytest.fixture(scope="module")
def reference(exported):
  """The run rebuilt with JAX, the BUSI test images at its resolution, and the JAX scorer's raw (maps, scores)."""
  import jax
  import jax.numpy as jnp
  from data_pipelines import datasets, preprocess
  from mediclip_jax import export
  wd, _, _ = exported
  before = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  try:
    run, changed = export.load_for_export(str(wd))
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before)
  assert changed == {}
  test = datasets.load_dataset(run.config.data.root).test
  files = [s.path for s in test]
  images = np.stack([preprocess.load_test_image(f, 64, run.config.data.color) for f in files])
  maps, scores = (np.asarray(a) for a in export.scorer_fn(run)(jnp.asarray(images)))
  return run, files, images, maps, scores


@pytest.mark.slow
def test_launcher_writes_both_formats_and_checks_them(exported):
  wd, out, stdout = exported
  assert sorted(os.listdir(out)) == ["model.jaxexport", "model.jaxexport.json", "model.onnx"]
  for fmt in ("onnx", "jax"):
    assert f"check {fmt}: {N_TEST} images" in stdout and "-> ok" in stdout, stdout
  again = _run(["launch/export.py", "--workdir", str(wd), "--check_images", "0"])
  assert again.returncode == 1 and "exists; pass --overwrite" in again.stderr, again.stderr[-2000:]


@pytest.mark.slow
def test_onnx_equals_jax_on_real_busi_images(exported, reference):
  from mediclip_jax import export
  _, out, _ = exported
  run, _, images, maps, scores = reference
  score, meta = export.load_onnx(str(out / "model.onnx"))
  for batch in (images, images[:1], images[:3]):  # the symbolic batch dimension takes any size
    m, s = score(batch)
    n = len(batch)
    assert m.shape == (n, 64, 64) and s.shape == (n,)
    np.testing.assert_allclose(m, maps[:n], rtol=0, atol=export.MAPS_ATOL)
    np.testing.assert_allclose(s, scores[:n], rtol=0, atol=export.SCORES_ATOL)
  assert meta["format"] == "onnx" and meta["method"] == "mediclip" and meta["step"] == run.step
  assert meta["image_size"] == 64 and meta["color"] == run.config.data.color
  assert meta["input"]["shape"] == ["batch", 64, 64, 3] if meta["color"] == "rgb" else ["batch", 64, 64]
  assert meta["normalization"] == run.metadata["normalization"] and meta["threshold"] == run.metadata["threshold"]


@pytest.mark.slow
def test_jax_export_equals_jax_on_real_busi_images(exported, reference):
  from mediclip_jax import export
  _, out, _ = exported
  run, _, images, maps, scores = reference
  score, meta = export.load_jax_export(str(out / "model.jaxexport"))
  for batch in (images, images[:1]):
    m, s = score(batch)
    np.testing.assert_allclose(m, maps[:len(batch)], rtol=0, atol=export.MAPS_ATOL)
    np.testing.assert_allclose(s, scores[:len(batch)], rtol=0, atol=export.SCORES_ATOL)
  assert meta["format"] == "jax.export" and meta["step"] == run.step and "cpu" in meta["platforms"]
  assert meta["normalization"] == run.metadata["normalization"]


@pytest.mark.slow
def test_grey_layout_exports_too(reference, tmp_path):
  """A grey-input run exports (batch, H, W): the same checkpoint with data.color = grey, both formats."""
  from mediclip_jax import export
  run, _, images, _, _ = reference
  color = run.config.data.color
  with run.config.unlocked():
    run.config.data.color = "grey"
  try:
    grey = images.mean(-1) if images.ndim == 4 else images
    ref = [np.asarray(a) for a in export.scorer_fn(run)(grey)]
    export.export_jax(run, str(tmp_path / "g.jaxexport"), platforms=("cpu",))
    export.export_onnx(run, str(tmp_path / "g.onnx"))
  finally:
    with run.config.unlocked():
      run.config.data.color = color
  for load, name in ((export.load_jax_export, "g.jaxexport"), (export.load_onnx, "g.onnx")):
    score, meta = load(str(tmp_path / name))
    assert meta["input"]["shape"] == ["batch", 64, 64] and meta["color"] == "grey"
    m, s = score(grey)
    np.testing.assert_allclose(m, ref[0], rtol=0, atol=export.MAPS_ATOL)
    np.testing.assert_allclose(s, ref[1], rtol=0, atol=export.SCORES_ATOL)



@pytest.mark.slow
def test_ssl_anovae_onnx_equals_jax(tmp_path):
  """A tiny random-init SSL-AnoVAE scorer exported to ONNX scores as JAX does. Guards the backbone's 3x3/2 max pool
  with padding 1: jax2onnx 0.17 exported nnx.max_pool's explicit padding as VALID (a 15x15 map for 16x16)."""
  for mod in ("onnxruntime", "onnx_ir", "jax2onnx"):
    pytest.importorskip(mod)
  import jax
  from mediclip_jax import config_defaults, export, parallel
  from mediclip_jax.evaluate import restore
  from mediclip_jax.methods import ssl_anovae
  c = config_defaults.ssl_anovae_config("tiny")
  c.data.image_size = c.data.phantom_size = c.model.image_size = 32
  c.model.encoder_widths = c.model.resnet_widths = (8, 16)
  c.model.decoder_widths, c.model.resnet_blocks, c.model.disc_widths = (16, 8), (1, 1), (8, 16)
  c.model.groups, c.model.latent_image, c.model.latent_ssl, c.model.projector_hidden = 4, 8, 8, 16
  trainable = ssl_anovae.build(c, None, str(tmp_path), parallel.make_mesh(jax.local_devices()[:1]), train=False)
  run = restore.Restored(c, trainable, trainable.state, {"normalization": {"low": 0.0, "threshold": 1.0}}, 0)
  export.export_onnx(run, str(tmp_path / "s.onnx"))
  score, _ = export.load_onnx(str(tmp_path / "s.onnx"))
  images = np.random.default_rng(0).random((3, 32, 32), np.float32)
  ref = [np.asarray(a) for a in export.scorer_fn(run)(images)]
  for batch in (images, images[:1]):
    m, s = score(batch)
    np.testing.assert_allclose(m, ref[0][:len(batch)], rtol=0, atol=export.MAPS_ATOL)
    np.testing.assert_allclose(s, ref[1][:len(batch)], rtol=0, atol=export.SCORES_ATOL)


NO_JAX = """
import runpy, sys
BLOCKED = ("jax", "jaxlib", "flax", "orbax", "optax", "jax2onnx")
class NoJax:
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in BLOCKED:
      raise ImportError(f"{name} is blocked in this test: the ONNX path must not import it")
    return None
sys.meta_path.insert(0, NoJax())
sys.argv = ["launch/predict.py"] + sys.argv[1:]
try:
  runpy.run_path("launch/predict.py", run_name="__main__")
finally:
  loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
  print("blocked modules loaded:", loaded, file=sys.stderr)
"""


@pytest.mark.slow
def test_predict_onnx_runs_without_jax(exported, reference, tmp_path):
  from mediclip_jax.evaluate.normalization import Normalization
  _, out, _ = exported
  run, files, _, _, scores = reference
  folder = tmp_path / "in"
  folder.mkdir()
  for f in files:
    os.symlink(f, folder / os.path.basename(f))
  proc = _run(["-c", NO_JAX, "--onnx", str(out / "model.onnx"), "--input", str(folder)])
  assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
  assert "blocked modules loaded: []" in proc.stderr
  pred_dir = out / "predictions"  # the default --out: beside the ONNX file
  records = {r["name"]: r for r in json.loads((pred_dir / "predictions.json").read_text())["predictions"]}
  assert len(records) == N_TEST
  norm = Normalization.from_dict(run.metadata["normalization"])
  for f, raw in zip(files, scores):
    r = records[os.path.basename(f)]
    assert abs(r["raw_score"] - float(raw)) <= 1e-5
    assert abs(r["score"] - float(norm(raw))) <= NORMALISED_ATOL
    assert r["abnormal"] == bool(raw > norm.threshold)
    assert os.path.getsize(r["panel"]) > 0 and Path(r["panel"]).parent == pred_dir


_FIXED_BATCH = """
import json, sys
import numpy as np
from launch import predict  # in its own process: launch modules define absl flags of the same names
done = []  # the batch size of every session.run
real = predict.onnx_file.open_session

def open_session(path):
  session, meta = real(path)

  class Recording:
    get_inputs = session.get_inputs

    def run(self, names, feed):
      done.append(next(iter(feed.values())).shape[0])
      return session.run(names, feed)
  return Recording(), meta

predict.onnx_file.open_session = open_session
model = predict.onnx_model(sys.argv[1])
maps, scores = model.score(np.load(sys.argv[2]))
np.savez(sys.argv[3], maps=maps, scores=scores, done=np.asarray(done), batch=model.batch_size)
"""


@pytest.mark.slow
def test_predict_onnx_pads_a_fixed_batch_model(exported, reference, tmp_path):
  """A fixed-batch ONNX model (here ours with the batch pinned to 4) scores 5 images: the last batch is padded."""
  import onnx
  from mediclip_jax import export
  _, out, _ = exported
  _, _, images, maps, scores = reference
  m = onnx.load(str(out / "model.onnx"))
  m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
  onnx.save(m, str(tmp_path / "fixed.onnx"))
  np.save(tmp_path / "images.npy", images[:5])
  proc = _run(["-c", _FIXED_BATCH, str(tmp_path / "fixed.onnx"), str(tmp_path / "images.npy"),
               str(tmp_path / "got.npz")], timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = np.load(tmp_path / "got.npz")
  assert int(got["batch"]) == 4 and got["done"].tolist() == [4, 4]  # the last batch of 1 padded to 4
  assert got["maps"].shape[0] == got["scores"].shape[0] == 5  # and the padded rows dropped
  np.testing.assert_allclose(got["maps"], maps[:5], rtol=0, atol=export.MAPS_ATOL)
  np.testing.assert_allclose(got["scores"], scores[:5], rtol=0, atol=export.SCORES_ATOL)


def test_predict_wants_exactly_one_model(tmp_path):
  for args, msg in ((["--workdir", "w", "--onnx", "m.onnx"], "not both"), ([], "give either --workdir")):
    proc = _run(["launch/predict.py", *args, "--input", str(tmp_path)], timeout=120)
    assert proc.returncode == 1 and msg in proc.stderr, proc.stderr[-2000:]


def test_predict_onnx_names_a_missing_or_foreign_file(tmp_path):
  pytest.importorskip("onnxruntime")
  img = tmp_path / "x.png"
  from PIL import Image
  Image.new("L", (8, 8)).save(img)
  bad = tmp_path / "bad.onnx"
  bad.write_bytes(b"not an onnx file")
  for model, msg in ((tmp_path / "missing.onnx", "no such ONNX file"), (bad, "onnxruntime cannot load it")):
    proc = _run(["launch/predict.py", "--onnx", str(model), "--input", str(img)], timeout=120)
    assert proc.returncode == 1 and f"{model}: {msg}" in proc.stderr, proc.stderr[-2000:]


def test_bfloat16_fields_become_float32():
  from mediclip_jax import export
  c = ml_collections.ConfigDict({"model": {"clip": {"dtype": "bfloat16"}, "dtype": "float32"},
                                 "vae": {"param_dtype": "float16"}, "data": {"color": "rgb"}})
  assert export._float32_fields(c) == {"model.clip.dtype": "bfloat16", "vae.param_dtype": "float16"}
  assert c.model.clip.dtype == c.vae.param_dtype == c.model.dtype == "float32" and c.data.color == "rgb"


def test_load_jax_export_names_the_file(tmp_path):
  from mediclip_jax import export
  with pytest.raises(FileNotFoundError, match="missing.jaxexport: no such jax.export file"):
    export.load_jax_export(str(tmp_path / "missing.jaxexport"))
  f = tmp_path / "m.jaxexport"
  f.write_bytes(b"junk")
  with pytest.raises(FileNotFoundError, match="m.jaxexport.json: the metadata sidecar"):
    export.load_jax_export(str(f))
  (tmp_path / "m.jaxexport.json").write_text(json.dumps({"format": "jax.export", "format_version": 1}))
  pytest.importorskip("flatbuffers")  # jax.export reads artefacts with it
  with pytest.raises(ValueError, match="m.jaxexport: not a readable jax.export artefact"):
    export.load_jax_export(str(f))


def test_export_launcher_names_a_missing_run(tmp_path):
  proc = _run(["launch/export.py", "--workdir", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], timeout=120)
  assert proc.returncode == 1 and f"{tmp_path / 'nope'}: no such run directory" in proc.stderr, proc.stderr[-2000:]
