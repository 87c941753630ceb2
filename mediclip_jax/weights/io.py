"""Reading and writing tensor files without trusting pickles.

Safetensors are parsed with numpy alone (the format is an 8-byte header length, a
JSON header and raw little-endian bytes), so converting public checkpoints needs
no torch. Pickled PyTorch files (`.pt`, `.pth`, `.bin`, `.ckpt`) are read only
through `torch.load(weights_only=True)`, which refuses arbitrary objects.
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping

import ml_dtypes
import numpy as np

_ST_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SAFETENSORS_SUFFIXES = (".safetensors",)


class CheckpointError(ValueError):
  """A checkpoint file is unreadable or does not match the model it is loaded into."""


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Returns (tensors, metadata) from a `.safetensors` file, read with numpy only."""
  path = os.fspath(path)
  with open(path, "rb") as f:
    raw = f.read()
  if len(raw) < 8:
    raise CheckpointError(f"{path}: too short to be a safetensors file ({len(raw)} bytes)")
  (n,) = struct.unpack("<Q", raw[:8])
  if n > len(raw) - 8:
    raise CheckpointError(f"{path}: header length {n} exceeds the file size; not a safetensors file")
  try:
    header = json.loads(raw[8:8 + n])
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from e
  meta = header.pop("__metadata__", None) or {}
  buf = memoryview(raw)[8 + n:]
  tensors = {}
  for name, info in header.items():
    dt = info.get("dtype")
    if dt not in _ST_DTYPES:
      raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dt!r}")
    start, end = info["data_offsets"]
    shape = tuple(info["shape"])
    dtype = _ST_DTYPES[dt]
    if end - start != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or end > len(buf):
      raise CheckpointError(f"{path}: tensor {name!r} byte range {start}:{end} does not match shape {shape} {dt}")
    tensors[name] = np.frombuffer(buf[start:end], dtype=dtype).reshape(shape).copy()
  return tensors, meta


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
  """Writes `tensors` as a safetensors file (atomically: a temp file, then rename)."""
  path = os.fspath(path)
  header: dict = {}
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  blobs, offset = [], 0
  for name in sorted(tensors):
    a = np.asarray(tensors[name], order="C")  # keeps 0-d scalars 0-d
    if a.dtype.newbyteorder("<") != a.dtype and a.dtype.byteorder == ">":
      a = a.astype(a.dtype.newbyteorder("<"))
    dt = _ST_NAMES.get(np.dtype(a.dtype))
    if dt is None:
      raise CheckpointError(f"{path}: cannot write tensor {name!r} of dtype {a.dtype}")
    b = a.tobytes()
    header[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [offset, offset + len(b)]}
    blobs.append(b)
    offset += len(b)
  hb = json.dumps(header, separators=(",", ":")).encode()
  hb += b" " * (-len(hb) % 8)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(hb)))
    f.write(hb)
    for b in blobs:
      f.write(b)
  os.replace(tmp, path)


def read_torch_pickle(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a pickled PyTorch state dict with `torch.load(weights_only=True)`.

  Nested dicts (e.g. `{"state_dict": {...}}` of Lightning `.ckpt` files) are
  flattened with dotted names; non-tensor leaves are dropped.
  """
  path = os.fspath(path)
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise CheckpointError(
        f"{path}: reading a pickled PyTorch file needs torch (pip install torch==2.13.0), "
        "or convert it to .safetensors first") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types for corrupt or unsafe files
    raise CheckpointError(f"{path}: torch.load(weights_only=True) failed: {e}") from e
  if hasattr(obj, "state_dict") and not isinstance(obj, Mapping):
    obj = obj.state_dict()
  if not isinstance(obj, Mapping):
    raise CheckpointError(f"{path}: expected a state dict (a mapping of tensors), got {type(obj).__name__}")
  out: dict[str, np.ndarray] = {}

  def walk(prefix: str, node):
    for k, v in node.items():
      key = f"{prefix}{k}"
      if isinstance(v, torch.Tensor):
        t = v.detach().cpu()
        out[key] = (t.float().numpy().astype(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16
                    else t.numpy().copy())
      elif isinstance(v, Mapping):
        walk(key + ".", v)

  walk("", obj)
  if not out:
    raise CheckpointError(f"{path}: no tensors found in the pickled object")
  return out


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a flat name->array dict from a safetensors or pickled PyTorch file, by suffix."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such file")
  if path.endswith(SAFETENSORS_SUFFIXES):
    return read_safetensors(path)[0]
  if path.endswith(PICKLE_SUFFIXES):
    return read_torch_pickle(path)
  raise CheckpointError(
      f"{path}: unknown checkpoint file type; expected one of "
      f"{', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)}")


def strip_prefix(tensors: Mapping[str, np.ndarray], prefixes: tuple[str, ...]) -> dict[str, np.ndarray]:
  """Removes the first matching wrapper prefix (e.g. 'module.', 'state_dict.') from every key."""
  for p in prefixes:
    if tensors and all(k.startswith(p) for k in tensors):
      return {k[len(p):]: v for k, v in tensors.items()}
  return dict(tensors)


def check_tensors(source: str, tensors: Mapping[str, np.ndarray],
                  expected: Mapping[str, tuple[int, ...]], allow_extra: tuple[str, ...] = ()) -> None:
  """Raises CheckpointError naming every missing, unexpected or mis-shaped tensor."""
  missing = sorted(k for k in expected if k not in tensors)
  extra = sorted(k for k in tensors if k not in expected and not any(k.startswith(p) or k == p for p in allow_extra))
  shapes = sorted(f"{k}: checkpoint {tuple(tensors[k].shape)}, model expects {tuple(expected[k])}"
                  for k in expected if k in tensors and tuple(tensors[k].shape) != tuple(expected[k]))
  problems = []
  if missing:
    problems.append(f"missing tensors ({len(missing)}): {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
  if extra:
    problems.append(f"unexpected tensors ({len(extra)}): {', '.join(extra[:20])}" + (" ..." if len(extra) > 20 else ""))
  if shapes:
    problems.append(f"wrongly shaped tensors ({len(shapes)}): {'; '.join(shapes[:20])}")
  if problems:
    raise CheckpointError(f"{source}: " + " | ".join(problems))


def check_finite(tensors: dict, src: str) -> None:
  """Refuses weights holding NaN or infinity, naming the tensors (converted, they would poison every run)."""
  bad = [k for k, v in tensors.items() if np.issubdtype(np.asarray(v).dtype, np.inexact)
         and not np.isfinite(np.asarray(v, np.float32)).all()]
  if bad:
    raise CheckpointError(f"{src}: {len(bad)} tensors hold NaN or infinite values ({', '.join(sorted(bad)[:5])}); "
                          "expected finite weights")
