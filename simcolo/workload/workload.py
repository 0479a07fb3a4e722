"""A workload: a lazy stream of :class:`Request` objects built from chunks of a trace or generator.

Each chunk (arrival_s, prompt_tokens, output_tokens, line) is transformed with numpy, in this order:

1. time window ``[start_s, end_s)`` on the source's own timeline (seconds since its first row);
2. rebase, so the first request that passes the window arrives at 0.0;
3. ``rate_scale`` (arrival_s / rate_scale: 2.0 means twice the request rate);
4. ``max_requests``;
5. requests longer than the model's context (``overlength``, ``simcolo.workload.overlength``): passed on
   unchanged for the serving system to refuse (``reject``), or clipped to fit and counted (``clip``).

Sources are sorted by time, so reading stops at the first row at or after ``end_s``, or once
``max_requests`` requests are out: rows after that point are never read (nor counted).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import numpy as np
import pandas as pd

from simcolo.workload.overlength import clip, exceeds_context
from simcolo.workload.request import Request

@dataclass
class WorkloadStats:
    """What the workload did to its source. Filled during iteration; final once it is exhausted."""

    source: str = ""
    num_requests: int = 0          # requests yielded
    num_clipped: int = 0           # requests with the prompt or the output clipped (overlength=clip)
    num_prompt_clipped: int = 0
    num_output_clipped: int = 0
    num_dropped_failed: int = 0    # rows the trace marks as failed requests (BurstGPT: 0 response tokens)
    num_outside_window: int = 0    # rows before start_s

    def as_dict(self) -> dict:
        return {f"workload_{k}": v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Transform:
    max_context_len: int
    rate_scale: float = 1.0
    start_s: float | None = None
    end_s: float | None = None
    max_requests: int | None = None
    overlength: str = "reject"     # reject | clip (simcolo.workload.overlength)


class Workload:
    """A one-pass stream of requests, like an open file.

    ``iter(workload)`` always returns the same underlying iterator, so a loop that stops early and a
    later loop over the same workload together see every request exactly once (the simulator uses
    this to mark the requests that never arrived). Build a new workload to start over.
    """

    def __init__(self, chunks: Callable[[], Iterator[pd.DataFrame]], transform: Transform, source: str):
        self._chunks = chunks
        self._stream: Iterator[Request] | None = None
        self.transform = transform
        self.stats = WorkloadStats(source=source)

    def __repr__(self) -> str:
        return f"Workload({self.stats.source!r}, {self.transform})"

    def __iter__(self) -> Iterator[Request]:
        if self._stream is None:
            self._stream = self._generate()
        return self._stream

    def __next__(self) -> Request:
        return next(iter(self))

    def _generate(self) -> Iterator[Request]:
        stats, t = self.stats, self.transform
        origin = None
        next_id = 0
        source = self._chunks()
        try:
            for chunk in source:
                arrival = chunk["arrival_s"].to_numpy()
                prompt = chunk["prompt_tokens"].to_numpy()
                output = chunk["output_tokens"].to_numpy()
                lines = chunk["line"].to_numpy()
                first, last = 0, len(arrival)
                stop_line = None     # reading stops here; failed rows before it are counted

                if t.start_s is not None:
                    first = int(np.searchsorted(arrival, t.start_s, "left"))
                    stats.num_outside_window += first
                if t.end_s is not None:
                    end = int(np.searchsorted(arrival, t.end_s, "left"))
                    if end < last:
                        last, stop_line = max(end, first), int(lines[end])
                if t.max_requests is not None and last - first >= t.max_requests - next_id:
                    last = first + t.max_requests - next_id      # > first: we return once it is reached
                    stop_line = int(lines[last - 1])

                failed = chunk.attrs.get("failed_lines", ())
                stats.num_dropped_failed += len(failed) if stop_line is None else sum(1 for f in failed if f < stop_line)

                if last > first:
                    arrival, prompt, output = arrival[first:last], prompt[first:last], output[first:last]
                    if origin is None:
                        origin = float(arrival[0])
                    arrival = (arrival - origin) / t.rate_scale
                    yield from self._requests(next_id, arrival, prompt, output)
                    next_id += last - first
                if stop_line is not None or (t.max_requests is not None and next_id >= t.max_requests):
                    return
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    def _requests(self, next_id: int, arrival: np.ndarray, prompt: np.ndarray, output: np.ndarray) -> Iterator[Request]:
        stats, t = self.stats, self.transform
        ids = range(next_id, next_id + len(arrival))
        clipped = None
        if t.overlength == "clip" and exceeds_context(prompt, output, t.max_context_len).any():
            prompt, output, prompt_clipped, output_clipped = clip(prompt, output, t.max_context_len)
            clipped = zip(prompt_clipped.tolist(), output_clipped.tolist())
        if clipped is None:
            for rid, a, p, o in zip(ids, arrival.tolist(), prompt.tolist(), output.tolist()):
                stats.num_requests += 1
                yield Request(rid, a, p, o)
            return
        for rid, a, p, o, (pc, oc) in zip(ids, arrival.tolist(), prompt.tolist(), output.tolist(), clipped):
            if pc or oc:
                stats.num_clipped += 1
                stats.num_prompt_clipped += pc
                stats.num_output_clipped += oc
            stats.num_requests += 1
            yield Request(rid, a, p, o)
