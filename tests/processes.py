"""Running several test processes together (multi-process JAX on 127.0.0.1), bounded in time."""
from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
  """A TCP port free on 127.0.0.1 now (for jax.distributed's coordinator)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_together(cmds: list[list[str]], logs: list[Path], timeout: float, env: dict[str, str], on_poll=None,
                 ok_codes: tuple[int, ...] = (0,)) -> list[int]:
  """Runs the commands together, each into its log; if one fails or time runs out, kills the rest (no
  stragglers). `on_poll(procs)` is called while they run (to send signals). Returns the exit codes."""
  files = [open(p, "w") for p in logs]  # pylint: disable=consider-using-with
  procs = [subprocess.Popen(c, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
           for c, f in zip(cmds, files)]
  deadline = time.time() + timeout
  try:
    while any(p.poll() is None for p in procs):
      if time.time() > deadline or any(p.returncode not in (None, *ok_codes) for p in procs):
        break
      if on_poll is not None:
        on_poll(procs)
      time.sleep(0.1)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait(timeout=30)
    for f in files:
      f.close()
  return [p.returncode for p in procs]
