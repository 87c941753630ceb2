"""Metric writers: JSON lines, TensorBoard event files (no TensorFlow needed), and a progress line.

Only process 0 writes (callers check `parallel.is_main_process()`). TensorBoard files are
TFRecord-framed `Event` protos with scalar summaries, encoded here directly, so the training
stack needs no tensorboard or TensorFlow install to produce them.
"""
from __future__ import annotations

import json
import math
import os
import socket
import struct
import sys
import time
from collections.abc import Mapping

import numpy as np


def _crc32c_table() -> list[int]:
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)
  return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for b in data:
    crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    b = n & 0x7F
    n >>= 7
    if n:
      out.append(b | 0x80)
    else:
      out.append(b)
      return bytes(out)


def _field(num: int, wire: int, payload: bytes) -> bytes:
  return _varint((num << 3) | wire) + payload


def _bytes_field(num: int, data: bytes) -> bytes:
  return _field(num, 2, _varint(len(data)) + data)


def encode_event(wall_time: float, step: int = 0, scalars: Mapping[str, float] | None = None,
                 file_version: str | None = None) -> bytes:
  """Serialises a tensorflow `Event` proto (wall_time=1, step=2, file_version=3, summary=5)."""
  msg = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
  if file_version is not None:
    msg += _bytes_field(3, file_version.encode())
  if scalars:
    summary = b"".join(
        _bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", float(v))))
        for tag, v in scalars.items())
    msg += _bytes_field(5, summary)
  return msg


def frame_record(data: bytes) -> bytes:
  """TFRecord framing: length, masked CRC of length, data, masked CRC of data."""
  header = struct.pack("<Q", len(data))
  return header + struct.pack("<I", masked_crc(header)) + data + struct.pack("<I", masked_crc(data))


def read_records(path: str) -> list[bytes]:
  """Reads and CRC-checks every record of a TFRecord/event file."""
  out = []
  with open(path, "rb") as f:
    raw = f.read()
  pos = 0
  while pos < len(raw):
    header = raw[pos:pos + 8]
    (n,) = struct.unpack("<Q", header)
    (hcrc,) = struct.unpack("<I", raw[pos + 8:pos + 12])
    data = raw[pos + 12:pos + 12 + n]
    (dcrc,) = struct.unpack("<I", raw[pos + 12 + n:pos + 16 + n])
    if hcrc != masked_crc(header) or dcrc != masked_crc(data):
      raise ValueError(f"{path}: corrupt record at byte {pos}")
    out.append(data)
    pos += 16 + n
  return out


class TensorBoardWriter:
  """Appends scalar summaries to `<logdir>/events.out.tfevents.<time>.<host>`."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    self.path = os.path.join(logdir, f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}")
    self._f = open(self.path, "ab")
    self._f.write(frame_record(encode_event(time.time(), 0, file_version="brain.Event:2")))
    self._f.flush()

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    finite = {k: float(v) for k, v in values.items() if isinstance(v, (int, float, np.floating, np.integer))}
    if finite:
      self._f.write(frame_record(encode_event(time.time(), int(step), finite)))
      self._f.flush()

  def close(self) -> None:
    self._f.close()


class JsonlWriter:
  """One JSON object per line, appended (a resumed run continues the same file)."""

  def __init__(self, path: str):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    self.path = path
    self._f = open(path, "a", encoding="utf-8")

  def write(self, record: Mapping) -> None:
    def clean(v):
      if isinstance(v, (np.floating, np.integer)):
        v = v.item()
      if isinstance(v, float) and not math.isfinite(v):
        return None
      return v
    self._f.write(json.dumps({k: clean(v) for k, v in record.items()}) + "\n")
    self._f.flush()

  def close(self) -> None:
    self._f.close()


class Progress:
  """A one-line progress bar with rate and ETA on stderr (redrawn in place on a terminal)."""

  def __init__(self, total: int, start: int = 0, stream=None, width: int = 30):
    self.total, self.start, self.width = total, start, width
    self.stream = stream or sys.stderr
    self.t0 = time.perf_counter()
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

  def update(self, step: int, extra: str = "") -> None:
    done = step - self.start
    elapsed = time.perf_counter() - self.t0
    rate = done / elapsed if elapsed > 0 and done > 0 else 0.0
    eta = (self.total - step) / rate if rate > 0 else float("nan")
    frac = step / max(self.total, 1)
    bar = "#" * int(frac * self.width) + "." * (self.width - int(frac * self.width))
    eta_s = "?" if not math.isfinite(eta) else time.strftime("%H:%M:%S", time.gmtime(eta))
    line = f"[{bar}] {step}/{self.total} {rate:.2f} step/s ETA {eta_s} {extra}"
    self.stream.write(("\r" + line) if self.tty else (line + "\n"))
    self.stream.flush()

  def close(self) -> None:
    if self.tty:
      self.stream.write("\n")
      self.stream.flush()
