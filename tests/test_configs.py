"""Shipped configs: variants by name, typed overrides, presets as defaults that overrides beat, invalid
values refused, and every field read by something."""
from __future__ import annotations

import contextlib
import json
import re
import importlib.util
import subprocess
import sys

import ml_collections
import pytest

from mediclip_jax import methods
from mediclip_jax.config_utils import parse_arg
from mediclip_jax.models.clip import VARIANTS, clip_from_config, get_variant, load_clip
from mediclip_jax.methods import mediclip as mediclip_method
from mediclip_jax.train import loop
from tests.conftest import REPO

DATASET_CONFIGS = ("chestxray", "brainmri", "busi")
ALL_CONFIGS = DATASET_CONFIGS + ("ssl_anovae", "mirage", "latent_diffusion", "bench_tiny", "bench_reference", "bench_latent",
                                  "bench_ssl_anovae", "bench_mirage", "bench_latent_diffusion")


def load_config(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def leaf_paths(c: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  out = []
  for k, v in c.items():
    if isinstance(v, ml_collections.ConfigDict) and k != "probs":
      out += leaf_paths(v, f"{prefix}{k}.")
    else:
      out.append(prefix + k)
  return out


@pytest.mark.parametrize("variant,width,layers,patch,taps", [
    ("ViT-B-32", 768, 12, 32, (6, 9, 12)), ("ViT-B-16", 768, 12, 16, (6, 9, 12)),
    ("ViT-L-14", 1024, 24, 14, (12, 18, 24)), ("ViT-L-14-336", 1024, 24, 14, (12, 18, 24))])
def test_variants_selectable_by_name(variant, width, layers, patch, taps):
  c = load_config("brainmri", f"variant={variant}").model.clip
  arch = get_variant(c.variant)
  assert (arch.vision_width, arch.vision_layers, arch.patch_size) == (width, layers, patch)
  assert tuple(c.tap_layers) == () and mediclip_method.default_taps(arch.vision_layers) == taps  # derived
  assert get_variant(variant.replace("-", "/", 1)) == arch  # "ViT-L/14" spelling works too


def test_tiny_config_builds_a_model():
  c = load_config("chestxray", "phantom,tiny").model.clip
  model = clip_from_config(c)
  assert model.cfg == VARIANTS["tiny"] and mediclip_method.default_taps(len(model.visual.blocks)) == (2, 3, 4)


def test_without_a_name_or_checkpoint_the_backbone_is_the_reference_vit_l14():
  c = load_config("busi").model.clip
  assert c.variant is None and c.checkpoint is None
  assert mediclip_method.backbone_section(c).variant == "ViT-L-14"
  c.checkpoint = "ckpt/x"  # with a checkpoint the unnamed variant stays unset: its own architecture is used
  assert mediclip_method.backbone_section(c).variant is None


def test_bad_config_arguments_are_named():
  with pytest.raises(ValueError, match="'shots' is not one of"):
    parse_arg("shots=4", shot=16)
  with pytest.raises(ValueError, match="shot='four': expected int"):
    parse_arg("shot=four", shot=16)
  with pytest.raises(ValueError, match="unknown CLIP variant 'ViT-H-14'"):
    load_config("brainmri", "variant=ViT-H-14")
  with pytest.raises(ValueError, match="preset must be one of"):
    load_config("brainmri", "preset=fancy")


@pytest.mark.parametrize("field,value,message", [
    ("train.batch_size", 0, "config.train.batch_size must be a positive integer"),
    ("train.batch_size", -4, "config.train.batch_size must be a positive integer"),
    ("train.epochs", 0, "config.train.epochs must be a positive integer"),
    ("train.epochs", -3, "config.train.epochs must be a positive integer"),
    ("train.log_every_steps", 0, "config.train.log_every_steps"),
    ("train.checkpoint_every_steps", 0, "config.train.checkpoint_every_steps"),
    ("eval.every_epochs", 0, "config.eval.every_epochs must be a positive integer"),
    ("eval.smoothing_sigma", -1.0, "config.eval.smoothing_sigma must be >= 0"),
    ("eval.threshold_quantile", 1.5, "config.eval.threshold_quantile must lie in"),
])
def test_invalid_loop_values_raise_naming_the_field(field, value, message):
  c = load_config("chestxray", "phantom,tiny")
  section, key = field.split(".")
  c[section][key] = value
  with pytest.raises(ValueError, match=message):
    loop.validate(c)


@pytest.mark.parametrize("field,value,message", [
    ("eval.staging.k", 1, "config.eval.staging.k must be 0"),
    ("eval.staging.restarts", 0, "config.eval.staging.restarts"),
    ("eval.segmentation.quantile", 1.5, "config.eval.segmentation.quantile must lie in"),
    ("eval.segmentation.boundaries", 1, "config.eval.segmentation.boundaries"),
    ("loss.gan", "wgan", "config.loss.gan must be one of"),
    ("loss.adv", -0.1, "config.loss.adv must be >= 0"),
    ("train.ssl_mode", "frozen", "config.train.ssl_mode must be one of"),
    ("model.image_size", 96, "config.model.image_size"),
    ("ssl.ema_base", 1.5, "config.ssl.ema_base must lie in"),
    ("ssl.views.hflip_p", 2.0, "config.ssl.views.hflip_p"),
])
def test_invalid_ssl_anovae_values_raise_naming_the_field(field, value, message):
  from mediclip_jax.methods import ssl_anovae
  c = load_config("ssl_anovae", "oct_phantom,tiny")
  *section, key = field.split(".")
  node = c
  for part in section:
    node = node[part]
  node[key] = value
  with pytest.raises(ValueError, match=message):
    loop.validate(c)
    ssl_anovae.validate(c)


def test_ssl_anovae_config_arguments():
  c = load_config("ssl_anovae", "busi,tiny,latents=image,adv=0,views=cutout,ssl_mode=pretrain_frozen")
  assert c.method == "ssl_anovae" and c.data.root.endswith("busi") and not c.data.phantom
  assert c.model.latents == "image" and c.loss.adv == 0 and c.ssl.views.preset == "cutout"
  assert c.train.ssl_pretrain_epochs == c.train.epochs // 2 and c.eval.staging.grade_order == ("benign", "malignant")
  oct_ = load_config("ssl_anovae", "oct_phantom")
  assert oct_.data.phantom and oct_.data.phantom_kind == "oct" and oct_.eval.segmentation.layers
  with pytest.raises(ValueError, match="dataset='chest' is not one of"):
    load_config("ssl_anovae", "dataset=chest")


def test_invalid_method_values_raise_naming_the_field():
  c = load_config("chestxray", "phantom,tiny")
  c.synthesis.pixel.cutpaste.paste_mode = "blend"
  with pytest.raises(ValueError, match="paste_mode"):
    methods.get(c.method).validate(c)
  c = load_config("chestxray", "phantom,tiny")
  c.synthesis.probs.cutpaste = 0.5
  with pytest.raises(ValueError, match="synthesis.probs must sum to 1"):
    methods.get(c.method).validate(c)


# A launcher host: one Python process imports what launch/train.py and launch/benchmark.py import (~4 s of
# CPU per interpreter, most of a `--print_config` call), then forks one child per call. The child runs the
# launcher file as __main__ with its own argv, as `python launch/<launcher>.py ...` would: the launcher module,
# its absl flags and the config file are defined afresh in each child (the host itself never defines a flag).
# Measured on 2 loaded cores: the 18 override cases 72 -> about 10 CPU s.
_LAUNCHER_HOST = r"""
import json, os, runpy, signal, sys, tempfile, traceback
import flax, jax, jax.extend, jaxlib, ml_collections, numpy, optax, PIL.Image  # noqa: F401
from absl import app, flags  # noqa: F401
from ml_collections import config_flags  # noqa: F401
import data_pipelines.datasets, data_pipelines.run_data  # noqa: F401
import mediclip_jax.config_defaults, mediclip_jax.config_utils, mediclip_jax.methods  # noqa: F401
import mediclip_jax.parallel, mediclip_jax.train.loop, mediclip_jax.train.writers  # noqa: F401
import mediclip_jax.train.workdir  # noqa: F401
for line in sys.stdin:
  script, argv, timeout = json.loads(line)
  out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
  pid = os.fork()
  if pid == 0:
    os.dup2(out.fileno(), 1)
    os.dup2(err.fileno(), 2)
    signal.alarm(timeout)
    code = 0
    try:
      sys.argv, sys.path[0] = [script, *argv], os.path.dirname(script)
      runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
      if isinstance(e.code, str):
        print(e.code, file=sys.stderr)
    except BaseException:
      traceback.print_exc()
      code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  _, status = os.waitpid(pid, 0)
  out.seek(0)
  err.seek(0)
  print(json.dumps([os.waitstatus_to_exitcode(status), out.read().decode(), err.read().decode()]), flush=True)
"""


@contextlib.contextmanager
def launcher_host_process(env: dict[str, str] | None = None):
  """`run(launcher, argv) -> (returncode, stdout, stderr)` of `python launch/<launcher>.py argv` (cwd: the repo;
  `env`: the host's and so every child's environment, default this process's)."""
  host = subprocess.Popen([sys.executable, "-c", _LAUNCHER_HOST], cwd=REPO, env=env, stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True)

  def run(launcher: str, argv: list[str], timeout: int = 120) -> tuple[int, str, str]:
    host.stdin.write(json.dumps([str(REPO / "launch" / f"{launcher}.py"), argv, timeout]) + "\n")
    host.stdin.flush()
    line = host.stdout.readline()
    assert line, f"the launcher host exited with {host.wait()}"
    return tuple(json.loads(line))

  try:
    yield run
  finally:
    host.stdin.close()
    host.wait(timeout=60)


@pytest.fixture(scope="module")
def launcher_host():
  with launcher_host_process() as run:
    yield run


def _cli_config(run, argv: list[str], launcher: str = "train") -> ml_collections.ConfigDict:
  """The config as `launch/<launcher>.py --print_config` resolves it (absl flag parsing, overrides applied)."""
  returncode, stdout, stderr = run(launcher, [*argv, "--print_config"])
  assert returncode == 0, stderr[-2000:]
  return ml_collections.ConfigDict(__import__("yaml").unsafe_load(stdout))


def test_explicit_override_beats_the_preset(launcher_host):
  """--config.synthesis.pixel.cutpaste.paste_mode=poisson under the reference preset takes effect."""
  c = _cli_config(launcher_host, ["--config", "configs/busi.py:preset=reference",
                   "--config.synthesis.pixel.cutpaste.paste_mode=poisson", "--config.data.color=grey",
                   "--config.model.logit_scale=50.0"])
  assert c.synthesis.pixel.cutpaste.paste_mode == "poisson"
  assert c.data.color == "grey" and c.model.logit_scale == 50.0
  assert c.model.causal_text_mask is False and c.train.truncate_labels is True  # the rest of the preset stays
  ref = load_config("busi", "preset=reference")
  assert (ref.synthesis.pixel.cutpaste.paste_mode, ref.data.color, ref.eval.every_epochs) == ("hard", "rgb", 1)
  imp = load_config("busi", "preset=improved")
  assert (imp.synthesis.pixel.cutpaste.paste_mode, imp.data.color, imp.eval.every_epochs) == ("poisson", "grey", 10)


# A forked launcher per case (launcher_host: ~0.2 s each, the host's imports ~4 s once): all in the fast tier.
@pytest.mark.parametrize("name,launcher", [(n, l) for l in ("train", "benchmark") for n in ALL_CONFIGS])
def test_none_default_fields_take_command_line_overrides(launcher_host, name, launcher):
  """Every field whose default is None is typed, so `--config.x=value` works for it, in both launchers."""
  c = load_config(name)
  nones = [p for p in leaf_paths(c) if _get(c, p) is None]
  assert "model.clip.checkpoint" in nones or c.method != "mediclip"
  views = {f"ssl.views.{k}": ("(0.5, 1.0)" if k.startswith("crop_") else "0.25") for k in (
      "blur_p", "blur_sigma", "brightness", "contrast", "crop_ratio", "crop_scale", "cutout_p", "cutout_size", "edge_p",
      "edge_strength", "gamma", "hflip_p", "noise_std", "rotate_deg", "speckle_std", "vflip_p")}
  views.update({f"augment.{k[len('ssl.views.'):]}": v for k, v in views.items()})  # the same fields, for diffusion
  overrides = {**views, "model.clip.checkpoint": "ckpt/vit_l14", "model.clip.act": "gelu", "model.logit_scale": "100.0",
               "model.bpe_path": "vocab.txt.gz", "data.root": "/data/x", "data.support_file": "s.json",
               "vae.path": "/w/taef2", "bench.peak_tflops": "989.0", "model.clip.variant": "ViT-B-16",
               "data.tfds_dir": "/data/tfds/x/1.0.0", "data.pairs.dataset_root": "/data/busi"}
  missing = sorted(set(nones) - set(overrides))
  assert not missing, f"add a test value for {missing}"
  argv = ["--config", f"configs/{name}.py"] + [f"--config.{p}={overrides[p]}" for p in nones]
  got = _cli_config(launcher_host, argv, launcher)
  for p in nones:
    assert str(_get(got, p)) == overrides[p], p


def _get(c, path):
  for k in path.split("."):
    c = c[k]
  return c


@pytest.mark.slow
def test_convert_weights_cli(tmp_path):
  pytest.importorskip("transformers")
  from tests.test_clip_parity import _hf_model
  _hf_model().save_pretrained(tmp_path / "hf")
  run = lambda *a: subprocess.run([sys.executable, "launch/convert_weights.py", *a], cwd=REPO,
                                  capture_output=True, text=True, timeout=300).returncode
  assert run("--src", str(tmp_path / "hf"), "--out", str(tmp_path / "own")) == 0
  assert (tmp_path / "own" / "model.safetensors").is_file()
  assert load_clip(tmp_path / "own").cfg.vision_width == 48
  assert run("--src", str(tmp_path / "hf"), "--out", str(tmp_path / "own")) == 2  # refuses to overwrite
  assert run("--src", str(tmp_path / "missing"), "--out", str(tmp_path / "x")) == 1


# ------------------------------------------------------------------------------------------------
# Every field is read by something
# ------------------------------------------------------------------------------------------------

class ReadRecorder:
  """Records which config paths code reads (attribute, item or .get access), not serialisation."""

  def __init__(self):
    self.paths: dict[int, str] = {}
    self.read: set[str] = set()
    self.mute = 0

  def register(self, c: ml_collections.ConfigDict, prefix: str = "") -> None:
    self.paths[id(c)] = prefix
    for k, v in c.items():
      if isinstance(v, ml_collections.ConfigDict):
        self.register(v, f"{prefix}{k}.")

  @contextlib.contextmanager
  def installed(self, monkeypatch):
    cd = ml_collections.ConfigDict
    orig_getattr, orig_getitem, orig_get = cd.__getattr__, cd.__getitem__, cd.get

    def note(obj, key):
      if not self.mute and id(obj) in self.paths:
        self.read.add(self.paths[id(obj)] + str(key))

    def getattr_(obj, key):
      note(obj, key)
      return orig_getattr(obj, key)

    def getitem_(obj, key):
      note(obj, key)
      return orig_getitem(obj, key)

    def get_(obj, key, default=None):
      note(obj, key)
      return orig_get(obj, key, default)

    def muted(fn):
      def wrapper(*a, **k):
        self.mute += 1
        try:
          return fn(*a, **k)
        finally:
          self.mute -= 1
      return wrapper

    monkeypatch.setattr(cd, "__getattr__", getattr_)
    monkeypatch.setattr(cd, "__getitem__", getitem_)
    monkeypatch.setattr(cd, "get", get_)
    for name in ("to_json_best_effort", "to_json", "to_dict", "copy_and_resolve_references", "__str__", "__repr__"):
      monkeypatch.setattr(cd, name, muted(getattr(cd, name)))
    yield self


def _code(src: str) -> str:
  """Source without docstrings and comments (a field named only in prose is not read)."""
  import ast
  import io
  import tokenize
  tree = ast.parse(src)
  doc_lines = set()
  for node in ast.walk(tree):
    body = getattr(node, "body", None)
    if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(
        getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
      doc_lines.update(range(body[0].lineno, body[0].end_lineno + 1))
  out = []
  for tok in tokenize.generate_tokens(io.StringIO(src).readline):
    if tok.type != tokenize.COMMENT and tok.start[0] not in doc_lines:
      out.append(tok.string)
  return " ".join(out)


# Fields read only on a branch the runs below do not take, with the reason: checked statically instead.
BRANCH_ONLY = {
    "vae.layout": "read when an AutoencoderKL checkpoint file is loaded (tests/test_vae.py)",
    "data.tfds_dir": "read when data.source='tfds' (tests/test_tfds_run.py)",
    "eval.histogram_bits": "read when eval.streaming (tests/test_tfds_run.py)",
    "data.pairs.dataset_root": "read for the *_captions pair sources (tests/test_captions.py, the MIRAGE sweeps)",
    "data.pairs.classes": "read for a user pairs file (tests/test_mirage_train.py: test_config_arguments)",
}


@pytest.mark.slow
def test_every_field_of_every_shipped_config_is_read(tmp_path, monkeypatch, shared_dir):
  """Runs the code paths that consume configs with a read recorder and fails on any unread field."""
  from mediclip_jax.models import vae as vae_lib
  rec = ReadRecorder()
  phantom = load_config("chestxray", "phantom,tiny")
  latent = load_config("brainmri", f"tiny,latent,vae_path={shared_dir / 'weights' / 'taef2'}")
  for c in (phantom, latent):
    c.train.epochs = 1
    c.data.image_size = 64
    c.data.phantom_size = 64
    c.data.phantom_n_test = 4
    c.synthesis.latent.patch_sizes = (1, 2, 4)
    c.synthesis.latent.patch_probs = (0.4, 0.3, 0.3)
  latent.data.root = str(shared_dir / "data" / "brainmri")
  latent.data.pixel_metrics = "off"
  ssl = load_config("ssl_anovae", "oct_phantom,tiny")  # staging and both segmentations on the OCT phantom
  ssl.train.epochs = 1
  ssl.data.phantom_n_train, ssl.data.phantom_n_test = 16, 4
  mirage = load_config("mirage", "phantom_reports,tiny,fp_rate=0.2")  # noise metrics; last_blocks reads train_blocks
  mirage.train.epochs, mirage.train.batch_size, mirage.data.pairs.n = 1, 8, 40
  mirage.mirage.trainable, mirage.mirage.distill_weight, mirage.mirage.bank_size = "last_blocks", 0.1, 16
  diffusion = load_config("latent_diffusion", f"phantom,tiny,noise=perlin,residual=both,"  # perlin: its lattice
                          f"vae_path={shared_dir / 'weights' / 'taef2'}")
  diffusion.train.epochs, diffusion.train.batch_size = 1, 8
  diffusion.data.phantom_n_train, diffusion.data.phantom_n_test, diffusion.data.image_size = 8, 4, 32
  diffusion.diffusion.perlin_octaves, diffusion.score.reverse_steps = 2, 2
  with rec.installed(monkeypatch):
    for i, c in enumerate((phantom, latent, ssl, mirage, diffusion)):
      rec.register(c)
      loop.train_and_evaluate(c, str(tmp_path / f"run{i}"), methods.get(c.method))
    for kind in ("taef2", "autoencoder_kl"):
      v = load_config("bench_tiny", "latent")
      v.vae.kind = kind
      rec.register(v)
      vae_lib.load_vae(v.vae)
  read = set(rec.read)
  # The benchmark section is read by launch/benchmark.py, exercised by tests/test_benchmark.py.
  bench_code = " ".join(_code((REPO / f).read_text()) for f in ("launch/benchmark.py",
                                                                 "mediclip_jax/methods/mediclip_bench.py",
                                                                 "mediclip_jax/methods/latent_diffusion_bench.py"))
  for name in ALL_CONFIGS:
    unread = []
    for p in leaf_paths(load_config(name)):
      if p in read or p in BRANCH_ONLY:
        continue
      if p.startswith("bench.") and re.search(rf"\bbench\s*\.\s*{p.split('.', 1)[1]}\b", bench_code):
        continue
      unread.append(p)
    assert not unread, f"configs/{name}.py has fields nothing reads: {unread}"
