"""Opt-in wall-clock accounting of named parts of an engine step (benchmarks and the profiler read it)."""
import time
from collections import defaultdict
from contextlib import contextmanager


class Timings:
    def __init__(self):
        self.enabled = False
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def section(self, name: str):
        if not self.enabled:
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def take(self) -> dict[str, float]:
        """The seconds accumulated since the last take(), by section."""
        out, self.seconds = dict(self.seconds), defaultdict(float)
        return out


TIMINGS = Timings()
