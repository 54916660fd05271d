"""The timing rule every benchmark here uses (imported by the bench_*.py scripts)."""

import statistics
import time


def median_time(fn, repeats: int) -> float:
  """Median wall time of `repeats` calls of `fn` after one warm-up call (compilation, allocator)."""
  fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)
