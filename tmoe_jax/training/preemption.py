"""Turns SIGTERM / SIGINT into a request to checkpoint and stop at the next step."""

from __future__ import annotations

import os
import signal
import sys
import threading


class PreemptionGuard:
  """Context manager: the first signal sets `requested`; a second one exits at once.

  The training loop polls `requested` after every step, saves a checkpoint and
  returns, so a preempted run loses at most one step of work.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = False
    self.signal_name = ""
    self._previous = {}

  def _handle(self, signum, frame):
    if self.requested:
      sys.stderr.write(f"\nsecond {signal.Signals(signum).name}: exiting without saving\n")
      os._exit(128 + signum)
    self.requested = True
    self.signal_name = signal.Signals(signum).name
    sys.stderr.write(
      f"\n{self.signal_name} received: saving a checkpoint and stopping (send it again to exit at once)\n"
    )

  def __enter__(self):
    # Signal handlers can only be installed from the main thread (not from a notebook worker).
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()
    return False
