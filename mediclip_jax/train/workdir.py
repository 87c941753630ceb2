"""A trainer's hold on its workdir: an exclusive lock, and clean-up of a start that failed.

Only process 0 of a run takes them (the other processes write nothing but their checkpoint shards).
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time

from mediclip_jax import checkpoints

LOCK_FILE = ".lock"


class WorkdirBusy(RuntimeError):
  """Another trainer holds the workdir."""


class Lock:
  """Exclusive `flock` on `<workdir>/.lock`, held for the whole run; the file names the holder (host, pid,
  start time) so that a second trainer can say who has it. The kernel drops the lock when the process
  dies, however it dies, so a killed run never leaves a stale lock behind."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd = None

  def __enter__(self):
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.read(fd, 4096).decode(errors="replace").strip()
      os.close(fd)
      try:
        h = json.loads(holder)
        who = f"pid {h['pid']} on {h['host']}, since {h['since']}"
      except (ValueError, KeyError, TypeError):
        who = "another process"
      raise WorkdirBusy(f"{os.path.dirname(self.path)} is in use by a trainer ({who}); wait for it to finish "
                        "or stop it, or choose another --workdir") from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
    self._fd = fd
    return self

  def __exit__(self, *exc):
    if self._fd is not None:
      os.close(self._fd)  # releases the lock
      self._fd = None


class FailedStartCleanup:
  """What this invocation adds to a workdir that holds no checkpoint yet: removed again if the run
  fails before writing its first checkpoint, so a failed start leaves no config.json, support set
  or half a metrics log that describe a run which does not exist. Nothing that existed before is touched."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.existed = os.path.isdir(workdir)
    self.before = set(os.listdir(workdir)) if self.existed else set()
    os.makedirs(workdir, exist_ok=True)

  def remove_unless_checkpointed(self) -> None:
    if checkpoints.has_checkpoint(os.path.join(self.workdir, "checkpoints")):
      return
    for name in set(os.listdir(self.workdir)) - self.before:
      path = os.path.join(self.workdir, name)
      shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    if not self.existed and not os.listdir(self.workdir):
      os.rmdir(self.workdir)
