"""data/prefetch.py: the train loop's inputs made ahead of it, in order, errors where they belong."""
import threading
import time

import pytest

from flamingo_jax.data.prefetch import Prefetcher


@pytest.mark.parametrize("ahead", [0, 1, 2])
def test_items_come_in_step_order(ahead):
  assert list(Prefetcher(lambda step: step * step, 3, 9, ahead)) == [9, 16, 25, 36, 49, 64]
  assert list(Prefetcher(lambda step: step, 5, 5, ahead)) == []


def test_makes_ahead_of_the_consumer_but_no_further_than_asked():
  made, third = [], threading.Event()

  def make(step):
    made.append(step)
    if step == 2:
      third.set()
    return step

  p = Prefetcher(make, 0, 100, ahead=2)
  try:
    # Nothing consumed yet: two made items wait, the thread holds the third.
    assert third.wait(timeout=30)
    time.sleep(0.3)  # time enough to run past the bound, were there none
    assert made == [0, 1, 2]
    assert next(p) == 0
    deadline = time.monotonic() + 30
    while len(made) < 4 and time.monotonic() < deadline:
      time.sleep(0.01)
    time.sleep(0.3)
    assert made == [0, 1, 2, 3]
  finally:
    p.close()
  assert not p._thread.is_alive()  # close() stopped it although its queue was full


@pytest.mark.parametrize("ahead", [0, 2])
def test_an_error_in_make_is_raised_at_its_step(ahead):
  made = []

  def make(step):
    made.append(step)
    if step == 2:
      raise ValueError("record 17: not a JPEG")
    return step

  p = Prefetcher(make, 0, 10, ahead)
  assert next(p) == 0 and next(p) == 1
  with pytest.raises(ValueError, match="record 17: not a JPEG"):
    next(p)
  p.close()
  assert made == [0, 1, 2]  # nothing made after the error


def test_ahead_0_makes_each_item_when_asked():
  made = []
  p = Prefetcher(lambda step: made.append(step) or step, 0, 5, ahead=0)
  time.sleep(0.1)
  assert made == [] and next(p) == 0 and made == [0]
  with pytest.raises(ValueError, match="ahead=-1"):
    Prefetcher(lambda step: step, 0, 1, ahead=-1)
