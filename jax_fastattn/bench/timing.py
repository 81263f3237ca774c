"""The one timing method every implementation goes through, and the
memory and bandwidth figures beside it."""
from __future__ import annotations

import resource
import time
from typing import Callable, List, Tuple

import numpy as np

# On a GPU each timed sample dispatches this many calls back to back and
# waits once, so that host dispatch time (tens of microseconds) does not
# count against a sub-millisecond kernel. On the CPU a call is one sample.
GPU_CALLS_PER_SAMPLE = 10


def sample_seconds(dispatch: Callable, wait: Callable, repeats: int, calls: int = 1) -> Tuple[List[float], float]:
    """`repeats` samples of the wall-clock time per call: each sample starts
    with the device idle, dispatches `calls` calls back to back and waits
    once for all of them (`wait(list_of_results)`). The caller has run one
    warm-up call. Returns (seconds per call of each sample, their median)."""
    if repeats < 1 or calls < 1:
        raise ValueError(f"repeats and calls must be >= 1, got {repeats} and {calls}")
    times = []
    for _ in range(repeats):
        wait([])  # nothing of the previous sample still queued
        start = time.perf_counter()
        wait([dispatch() for _ in range(calls)])
        times.append((time.perf_counter() - start) / calls)
    return times, float(np.median(times))


def status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS mark (VmHWM) of this process (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    try:
        return status_mb("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def numpy_copy_bandwidth(nbytes: int, repeats: int) -> Tuple[List[float], float, float]:
    """The host's copy bandwidth with numpy over max(nbytes, 1 GiB):
    (times, median, bytes read + written per second)."""
    n = max(nbytes, 2**30) // 4
    src = np.random.default_rng(0).random(n, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    times, median = sample_seconds(lambda: np.copyto(dst, src), lambda _: None, repeats)
    return times, median, 2 * src.nbytes / median


def device_copy_bandwidth(nbytes: int, repeats: int) -> Tuple[List[float], float, float]:
    """Device memory bandwidth: an elementwise bf16 op over max(nbytes,
    1 GiB), timed as the attention calls are: (times, median, bytes read +
    written per second)."""
    import jax
    import jax.numpy as jnp
    x = jnp.ones((max(nbytes, 2**30) // 2,), jnp.bfloat16)
    fn = jax.jit(lambda x: x * 2).lower(x).compile()
    jax.block_until_ready(fn(x))
    times, median = sample_seconds(lambda: fn(x), jax.block_until_ready, repeats, GPU_CALLS_PER_SAMPLE)
    return times, median, 2 * x.nbytes / median
