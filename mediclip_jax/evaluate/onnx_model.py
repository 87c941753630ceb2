"""An exported ONNX detector (mediclip_jax.export) opened with onnxruntime: the one place that reads
the file and its metadata, numpy only, so that inference without JAX (`launch/predict.py --onnx`) and the
exporter's own check share it.
"""
from __future__ import annotations

import json
import os
from typing import Any

INPUT_NAME = "images"                  # (batch, H, W) grey or (batch, H, W, 3) RGB, float32 in [0, 1]
OUTPUT_NAMES = ("maps", "scores")      # raw anomaly maps (batch, H, W) and image scores (batch,)
FORMAT_VERSION = 1


def metadata_props(meta: dict[str, Any]) -> dict[str, str]:
  """ONNX metadata_props are strings: one key per field, its value JSON-encoded."""
  return {k: json.dumps(v) for k, v in meta.items()}


def read_metadata(props: dict[str, str]) -> dict[str, Any]:
  """The metadata back from an ONNX file's metadata_props (onnxruntime: `get_modelmeta().custom_metadata_map`)."""
  return {k: json.loads(v) for k, v in props.items()}


def open_session(path: str):
  """(onnxruntime session on the CPU, metadata) of an exported file; errors name the file."""
  try:
    import onnxruntime as ort  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"{path}: running an ONNX model needs onnxruntime (pip install onnxruntime, or the "
                      "package's onnx_inference extra)") from e
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such ONNX file")
  try:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
  except Exception as e:  # pylint: disable=broad-except  # onnxruntime raises its own types: name the file
    raise ValueError(f"{path}: onnxruntime cannot load it ({type(e).__name__}: {e})") from e
  try:
    meta = read_metadata(session.get_modelmeta().custom_metadata_map)
  except ValueError as e:
    raise ValueError(f"{path}: metadata is not JSON-encoded ({e}); not written by launch/export.py") from e
  return session, meta
