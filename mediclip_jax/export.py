"""Exports a trained detector as a self-contained scoring program: ONNX, and a serialized `jax.export` artefact.

Why: a trained run is a config, a checkpoint and this package; a deployment wants one file that maps
images to anomaly maps and scores. Both formats hold one function

  images (batch, H, W) grey or (batch, H, W, 3) RGB, float32 in [0, 1]
    -> maps (batch, H, W) float32, scores (batch,) float32      (RAW: normalise with the metadata)

with a symbolic batch dimension and every parameter baked in as a constant. It is the method's own
`Trainable.scorer(state)` (the same function evaluation and launch/predict.py call), traced once, so
any method exports the same way; method-specific work done once per scorer call (MediCLIP's text
features) is folded into constants too.

  model.onnx                via jax2onnx; runs under onnxruntime with no JAX. The metadata is stored in
                            the file's metadata_props, one key per field, each value JSON-encoded.
  model.jaxexport           `jax.export.Exported.serialize()` bytes (needs jax + flatbuffers to load, not
                            this package); lowered for `platforms` (default cpu and cuda). The metadata is
                            in the JSON sidecar `model.jaxexport.json` (`load_jax_export` reads both).

Metadata (both formats): format, format_version, producer, method, step, image_size, color, input
(name, shape, dtype, range, layout), outputs, normalization {low, threshold}, threshold (raw decision
threshold), eval_batch_size, preprocessing (the method's recorded image preprocessing), compute_dtype
("float32") and trained_dtypes (fields that were bfloat16 in training and were rebuilt in float32).

Export always computes in float32: a run trained with a bfloat16 compute dtype is rebuilt with its
`*.dtype` fields set to float32 (parameters are stored in float32 either way). Export runs on one
device of one process. jax2onnx is optional (the `export` extra, installed with --no-deps; see
docs/export.md) and is imported only by `export_onnx`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import mediclip_jax
from mediclip_jax import parallel
from mediclip_jax.evaluate import onnx_model, restore

FORMAT_VERSION = onnx_model.FORMAT_VERSION
ONNX_FILE = "model.onnx"
JAX_FILE = "model.jaxexport"
METADATA_SUFFIX = ".json"  # the jax.export sidecar: <file>.json
INPUT_NAME, OUTPUT_NAMES = onnx_model.INPUT_NAME, onnx_model.OUTPUT_NAMES
BATCH = "batch"  # the symbolic batch dimension's name in both formats
DEFAULT_PLATFORMS = ("cpu", "cuda")
ONNX_OPSET = 23
# Above this many bytes of constants the ONNX weights go to an external `<file>.data` (protobuf caps a file at 2 GiB).
ONNX_EXTERNAL_DATA_BYTES = 1_500_000_000
# What launch/export.py and tests/test_export.py accept between an artefact and the JAX scorer (float32 both).
MAPS_ATOL = 1e-4
SCORES_ATOL = 1e-5
_LOW_PRECISION = ("bfloat16", "float16", "bf16", "fp16", "half")

Scorer = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


# ----------------------------------------------------------------------------------------------
# The run, rebuilt for export
# ----------------------------------------------------------------------------------------------

def _float32_fields(c: ml_collections.ConfigDict, prefix: str = "") -> dict[str, str]:
  """Sets every low-precision `dtype` field of `c` (recursively) to float32; returns {path: old value}."""
  changed = {}
  for key in list(c.keys()):
    value = c[key]
    path = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      changed.update(_float32_fields(value, path + "."))
    elif key.endswith("dtype") and isinstance(value, str) and value.lower() in _LOW_PRECISION:
      c[key] = "float32"
      changed[path] = value
  return changed


def load_for_export(workdir: str, step: int | None = None) -> tuple[restore.Restored, dict[str, str]]:
  """The run of `workdir` rebuilt in float32 on one device, and the dtype fields that were changed for it."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"{workdir}: no such run directory")
  if jax.process_count() > 1:
    raise ValueError(f"{workdir}: export runs in a single process; got {jax.process_count()} processes")
  config, _ = restore.stored_config(workdir, step)
  with config.unlocked():
    changed = _float32_fields(config)
  run = restore.load_run(workdir, parallel.make_mesh(jax.local_devices()[:1]), config=config, step=step)
  if not run.metadata.get("normalization"):
    raise ValueError(f"{workdir}: checkpoint step {run.step} has no score normalisation (written before "
                     "calibration, or by an older version): finish the run with launch/train.py, then export")
  return run, changed


def input_shape(run: restore.Restored) -> tuple[int, ...]:
  """The shape of one image the scorer takes: (H, W) grey or (H, W, 3) RGB."""
  size, color = int(run.config.data.image_size), run.config.data.color
  if color not in ("grey", "rgb"):
    raise ValueError(f"config.data.color must be 'grey' or 'rgb', got {color!r}")
  return (size, size) if color == "grey" else (size, size, 3)


def metadata(run: restore.Restored, fmt: str, trained_dtypes: dict[str, str] | None = None) -> dict[str, Any]:
  """What a consumer of an exported file needs beside the function (JSON-able)."""
  cfg, meta = run.config, run.metadata
  shape = [BATCH, *input_shape(run)]
  layout = "NHW, one grey channel" if len(shape) == 3 else "NHWC, RGB"
  return {
      "format": fmt, "format_version": FORMAT_VERSION, "producer": f"mediclip_jax {mediclip_jax.__version__}",
      "method": cfg.method, "step": int(run.step), "image_size": int(cfg.data.image_size), "color": cfg.data.color,
      "input": {"name": INPUT_NAME, "shape": shape, "dtype": "float32", "range": [0.0, 1.0], "layout": layout},
      "outputs": {"maps": [BATCH, shape[1], shape[2]], "scores": [BATCH], "scale": "raw"},
      "normalization": {k: float(v) for k, v in meta["normalization"].items()},
      "threshold": float(meta.get("threshold", meta["normalization"]["threshold"])),
      "eval_batch_size": int(cfg.eval.batch_size),
      "preprocessing": meta.get("preprocessing", {}),
      "compute_dtype": "float32", "trained_dtypes": dict(trained_dtypes or {}),
  }


def scorer_fn(run: restore.Restored) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:
  """The method's generic scorer closed over the restored state: images -> raw (maps, scores)."""
  return run.trainable.scorer(run.state)


def _pruned(fn: Callable, spec: jax.ShapeDtypeStruct) -> Callable:
  """`fn` with the constants its outputs do not need dropped (the text tower's weights, for MediCLIP).

  A jitted function keeps every argument it is given, so constants that reach an inner jit unused
  (the frozen model's text tower, when text features are precomputed) would be serialised too. Tracing
  to a jaxpr and removing dead code (inner jits included) keeps only what the outputs depend on. Uses
  JAX's internal dead-code pass; without it the export is the same function, only larger.
  """
  try:
    from jax._src.interpreters import partial_eval as pe  # pylint: disable=import-outside-toplevel
    import jax.extend as jex  # pylint: disable=import-outside-toplevel
    closed = jax.make_jaxpr(fn)(spec)
    n = len(closed.consts)
    jaxpr = pe.convert_constvars_jaxpr(closed.jaxpr)
    jaxpr, used = pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars), instantiate=True)
    consts = [c for c, u in zip(closed.consts, used[:n]) if u]
    call = jex.core.jaxpr_as_fun(jex.core.ClosedJaxpr(jaxpr, []))
    return lambda images: tuple(call(*consts, images))
  except (ImportError, AttributeError, TypeError) as e:  # JAX moved its internals: export unpruned
    logging.warning("export: dead-constant pruning unavailable (%s); the artefact keeps unused constants", e)
    return fn


# ----------------------------------------------------------------------------------------------
# jax.export
# ----------------------------------------------------------------------------------------------

def export_jax(run: restore.Restored, path: str, platforms: tuple[str, ...] = DEFAULT_PLATFORMS,
               trained_dtypes: dict[str, str] | None = None) -> dict[str, Any]:
  """Writes the scorer as serialized `jax.export` bytes to `path` and its metadata to `path`.json."""
  batch, = jax.export.symbolic_shape(BATCH)
  spec = jax.ShapeDtypeStruct((batch, *input_shape(run)), jnp.float32)
  fn = _pruned(scorer_fn(run), spec)
  exported = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(spec)
  try:
    data = exported.serialize()
  except ImportError as e:  # jax.export serialises with the flatbuffers package
    raise ImportError(f"{path}: serializing a jax.export artefact needs the 'flatbuffers' package "
                      "(pip install flatbuffers)") from e
  meta = metadata(run, "jax.export", trained_dtypes)
  meta.update(platforms=list(exported.platforms), jax_version=jax.__version__,
              serialization_version=int(exported.calling_convention_version))
  with open(path, "wb") as f:
    f.write(data)
  with open(path + METADATA_SUFFIX, "w") as f:
    json.dump(meta, f, indent=2)
  return meta


def load_jax_export(path: str) -> tuple[Scorer, dict[str, Any]]:
  """(images -> raw (maps, scores) as numpy, metadata) from a `.jaxexport` file and its `.json` sidecar.

  Any batch size works; each new one compiles once.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such jax.export file")
  side = path + METADATA_SUFFIX
  if not os.path.isfile(side):
    raise FileNotFoundError(f"{side}: the metadata sidecar of {path} is missing (written by export_jax)")
  with open(side) as f:
    try:
      meta = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{side}: not valid JSON ({e})") from e
  if meta.get("format") != "jax.export" or meta.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{side}: expected format 'jax.export' version {FORMAT_VERSION}, got "
                     f"{meta.get('format')!r} version {meta.get('format_version')!r}")
  with open(path, "rb") as f:
    data = f.read()
  try:
    exported = jax.export.deserialize(bytearray(data))
  except ImportError as e:
    raise ImportError(f"{path}: loading a jax.export artefact needs the 'flatbuffers' package") from e
  except Exception as e:  # pylint: disable=broad-except  # corrupt or foreign bytes: say which file
    raise ValueError(f"{path}: not a readable jax.export artefact ({type(e).__name__}: {e})") from e
  call = jax.jit(exported.call)

  def score(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    maps, scores = call(np.asarray(images, np.float32))
    return np.asarray(maps), np.asarray(scores)

  return score, meta


# ----------------------------------------------------------------------------------------------
# ONNX
# ----------------------------------------------------------------------------------------------

def load_onnx(path: str) -> tuple[Scorer, dict[str, Any]]:
  """(images -> raw (maps, scores), metadata) of an exported ONNX file, run by onnxruntime on the CPU."""
  session, meta = onnx_model.open_session(path)

  def score(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    maps, scores = session.run(list(OUTPUT_NAMES), {INPUT_NAME: np.asarray(images, np.float32)})
    return maps, scores

  return score, meta


def max_differences(reference: tuple[np.ndarray, np.ndarray], other: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
  """Max absolute difference of maps and of scores."""
  return {name: float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
          for name, a, b in zip(OUTPUT_NAMES, reference, other)}


def export_onnx(run: restore.Restored, path: str, trained_dtypes: dict[str, str] | None = None,
                opset: int = ONNX_OPSET) -> dict[str, Any]:
  """Writes the scorer as an ONNX model to `path` (jax2onnx), the metadata in its metadata_props.

  Weights go to `<path>.data` beside it only when they would exceed ONNX_EXTERNAL_DATA_BYTES.
  """
  # pylint: disable=import-outside-toplevel
  try:
    import jax2onnx
    import onnx_ir
  except ImportError as e:
    raise ImportError(f"{path}: ONNX export needs jax2onnx and onnx-ir; install them as docs/export.md says "
                      f"({e})") from e
  meta = metadata(run, "onnx", trained_dtypes)
  meta.update(opset=int(opset), jax2onnx_version=_version("jax2onnx"))
  # jax2onnx logs its arguments on the root logger and plugin-discovery tracebacks (examples needing
  # equinox/dm_pix); onnx_ir warns about value infos it skips: none of it is a problem of this export.
  with _quiet({"": logging.WARNING, "jax2onnx": logging.ERROR, "onnx_ir": logging.ERROR}), warnings.catch_warnings():
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"jax2onnx\.")  # its Flax plugins' `.value`
    model = jax2onnx.to_onnx(scorer_fn(run), [(BATCH, *input_shape(run))], opset=opset, return_mode="ir",
                             model_name=f"mediclip_jax_{run.config.method}", input_names=[INPUT_NAME],
                             output_names=list(OUTPUT_NAMES))
    model.metadata_props.update(onnx_model.metadata_props(meta))
    model.producer_name, model.producer_version = "mediclip_jax", mediclip_jax.__version__
    weight_bytes = sum(int(np.prod(v.shape.numpy())) * v.dtype.itemsize
                       for v in model.graph.initializers.values() if v.shape is not None and v.dtype is not None)
    external = os.path.basename(path) + ".data" if weight_bytes > ONNX_EXTERNAL_DATA_BYTES else None
    onnx_ir.save(model, path, external_data=external)
  return meta


@contextlib.contextmanager
def _quiet(levels: dict[str, int]):
  """Raises the named loggers ("" = root) to at least the given levels for the duration."""
  saved = [(logging.getLogger(n or None), logging.getLogger(n or None).level) for n in levels]
  for (log, level), new in zip(saved, levels.values()):
    log.setLevel(max(level, new))
  try:
    yield
  finally:
    for log, level in saved:
      log.setLevel(level)


def _version(dist: str) -> str | None:
  import importlib.metadata  # pylint: disable=import-outside-toplevel
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return None
