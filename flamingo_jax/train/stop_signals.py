"""Stopping a run cleanly: SIGTERM or Ctrl-C asks the train loop to save and exit."""
import os
import signal
import threading


class StopSignals:
  """SIGTERM or a first Ctrl-C asks the loop to save a checkpoint and stop; a second Ctrl-C
  aborts at once. The signals are read by a thread from a wakeup fd: Python's own handlers
  wait while the main thread is inside XLA (a compile, a long step), this does not."""

  def __init__(self, say):
    self.signal, self._say = None, say
    read, self._write = os.pipe()
    os.set_blocking(self._write, False)
    self._previous = {s: signal.signal(s, lambda sig, frame: None)
                      for s in (signal.SIGINT, signal.SIGTERM)}
    self._previous_fd = signal.set_wakeup_fd(self._write)
    threading.Thread(target=self._watch, args=(read,), daemon=True).start()

  def _watch(self, read):
    while data := os.read(read, 1):
      sig = data[0]
      if sig == signal.SIGINT and self.signal is not None:
        os.write(2, b"\nCtrl-C again: aborted without saving\n")
        os._exit(128 + sig)
      if sig in (signal.SIGINT, signal.SIGTERM) and self.signal is None:
        self.signal = sig
        name = "Ctrl-C" if sig == signal.SIGINT else "SIGTERM"
        self._say(f"{name}: saving a checkpoint after this step, then exiting "
                  "(Ctrl-C again aborts without saving)")
    os.close(read)

  def close(self):
    signal.set_wakeup_fd(self._previous_fd)
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    os.close(self._write)  # ends the thread
