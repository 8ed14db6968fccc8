"""GPU kernel events from a jax.profiler trace, for the benchmarks that report device (kernel) time."""

from __future__ import annotations

import collections
import glob
import tempfile
from collections.abc import Callable


def device_kernel_events(trace_dir: str) -> list[tuple[str, float, float]]:
    """(name, start ns, duration ns) of every event on a GPU plane's stream lines."""
    from jax._src.profiler import ProfileData  # jax's reader of the profiler's XSpace protobuf

    events = []
    for path in glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True):
        for plane in ProfileData.from_file(path).planes:
            if not plane.name.startswith("/device:GPU"):
                continue
            for line in plane.lines:
                if "stream" not in line.name.lower():
                    continue
                events += [(e.name, e.start_ns, e.duration_ns) for e in line.events]
    return events


def traced_kernel_events(run: Callable[[], object]) -> list[tuple[str, float, float]]:
    """Run `run` (which must block until its device work is done) under the profiler; its kernel events."""
    import jax

    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        run()
        jax.profiler.stop_trace()
        return device_kernel_events(trace_dir)


def kernel_us_per_call(program: Callable, args: tuple, calls: int) -> dict[str, float]:
    """Each kernel's device time in us per call of a jitted `program(*args)` that chains `calls` layer calls,
    compiled and run once before the traced run."""
    import jax

    compiled = jax.jit(program).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    totals: dict[str, float] = collections.defaultdict(float)
    for name, _, duration in traced_kernel_events(lambda: jax.block_until_ready(compiled(*args))):
        totals[name] += duration / calls / 1e3
    return dict(totals)
