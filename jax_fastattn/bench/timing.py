"""The one timing method every implementation goes through, and the
memory and bandwidth figures beside it."""
from __future__ import annotations

import resource
import time
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np

# On a GPU each timed sample dispatches this many calls back to back and
# waits once, so that host dispatch time (tens of microseconds) does not
# count against a sub-millisecond kernel. On the CPU a call is one sample.
GPU_CALLS_PER_SAMPLE = 10


def sample_seconds(dispatch: Callable, wait: Callable, repeats: int, calls: int = 1,
                   clock: Callable[[], float] = time.perf_counter) -> Tuple[List[float], float]:
    """`repeats` samples of the wall-clock time per call: each sample starts
    with the device idle, dispatches `calls` calls back to back and waits
    once for all of them (`wait(list_of_results)`). The caller has run one
    warm-up call. Returns (seconds per call of each sample, their median)."""
    if repeats < 1 or calls < 1:
        raise ValueError(f"repeats and calls must be >= 1, got {repeats} and {calls}")
    times = []
    for _ in range(repeats):
        wait([])  # nothing of the previous sample still queued
        start = clock()
        wait([dispatch() for _ in range(calls)])
        times.append((clock() - start) / calls)
    return times, float(np.median(times))


def round_robin_order(names: Sequence[str], repeats: int) -> List[str]:
    """The order of an interleaved run: `repeats` rounds, each timing every
    implementation once, the round's first one rotating (A B C, B C A,
    C A B, ...), so that no implementation always follows the same other
    one (whose caches and clocks it would inherit)."""
    names = list(names)
    return [names[(r + i) % len(names)] for r in range(repeats) for i in range(len(names))]


def interleaved_samples(impls: Dict[str, Tuple[Callable, Callable]], repeats: int, calls: int = 1,
                        clock: Callable[[], float] = time.perf_counter,
                        lead_in: bool = False) -> Tuple[Dict[str, List[float]], List[str]]:
    """Times several implementations in one process, round-robin: each
    sample is one `sample_seconds` sample (the same method as a lone run)
    of the implementation whose turn it is, in `round_robin_order`. A slow
    drift of the machine (another job, clocks, heat) then reaches every
    implementation alike instead of whichever ran during it. With `lead_in`
    each sample is preceded by one untimed call of the same implementation,
    so the timed call runs in that implementation's steady state: thread
    pools that spin after a call (OpenMP's, Eigen's) then belong to the
    implementation being timed instead of taking cores from the next one,
    and caches and clocks are its own. `impls` maps a name to (dispatch,
    wait); each has had its warm-up call. Returns ({name: seconds per call
    of each of its samples}, the order run)."""
    if not impls:
        raise ValueError("interleaved_samples needs at least one implementation")
    order = round_robin_order(impls, repeats)
    times: Dict[str, List[float]] = {name: [] for name in impls}
    for name in order:
        dispatch, wait = impls[name]
        if lead_in:
            wait([dispatch()])
        times[name] += sample_seconds(dispatch, wait, 1, calls, clock)[0]
    return times, order


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
