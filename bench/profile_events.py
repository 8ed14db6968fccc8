"""GPU kernel events from a jax.profiler trace, for the benchmarks that report device (kernel) time."""

from __future__ import annotations

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
