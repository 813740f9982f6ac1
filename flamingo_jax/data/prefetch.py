"""The train loop's input, made ahead of it: a background thread draws each step's batches
and puts them on the mesh while earlier steps run, so the devices never wait for the host.

The loop blocks on a step now and then (reading its metrics, checking the non-finite
counter, saving a checkpoint); without this, the next step's host work (reading and
decoding records, collating, the host → device copy) would start only then. Each item
carries the data iterators' state right after its batches were drawn: a checkpoint saves
the state of the batches the loop has consumed, not of those made ahead.
"""
import queue
import threading
from typing import Any, Callable


class Prefetcher:
  """Iterates over `make(step)` for step = start, ..., stop - 1, made in one background
  thread: up to `ahead` made items wait while it makes the next (`ahead` 0: no thread,
  each made when asked for). An exception in `make` is raised by the `next()` that would
  have returned its step."""

  def __init__(self, make: Callable[[int], Any], start: int, stop: int, ahead: int = 2):
    if ahead < 0:
      raise ValueError(f"ahead={ahead}: must be >= 0")
    self._make, self._stop = make, stop
    self._step, self._left = start, stop - start
    self._thread = None
    if ahead:
      self._queue: queue.Queue = queue.Queue(maxsize=ahead)
      self._closing = threading.Event()
      self._thread = threading.Thread(target=self._run, args=(start,), name="prefetch", daemon=True)
      self._thread.start()

  def _run(self, start: int) -> None:
    for step in range(start, self._stop):
      try:
        item = self._make(step)
      except BaseException as e:  # noqa: BLE001 (handed to the consumer)
        item = e
      while not self._closing.is_set():
        try:
          self._queue.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      if self._closing.is_set() or isinstance(item, BaseException):
        return

  def __iter__(self):
    return self

  def __next__(self) -> Any:
    if not self._left:
      raise StopIteration
    item = self._queue.get() if self._thread else self._make(self._step)
    self._step, self._left = self._step + 1, self._left - 1
    if isinstance(item, BaseException):
      raise item
    return item

  def close(self) -> None:
    """Stops the thread (after the `make` it is in, if any) and drops what it made."""
    if self._thread is None:
      return
    self._closing.set()
    self._thread.join()
    while not self._queue.empty():
      self._queue.get_nowait()
