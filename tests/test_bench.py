"""`python -m jax_fastattn.bench` pieces on the CPU: the worker times the
compiled function, and an implementation that is ours with a handler
override (fastattn-cuda-sm80) sets that override for its own process."""
import os

from jax_fastattn import bench


def test_worker_times_the_compiled_function():
    case = bench.Case(1, 128, 2, 2, 32, True, "float32", "fwd")
    result = bench.run_worker("fastattn-cpu", case, 5)
    assert len(result["times_s"]) == 5 and result["median_s"] > 0
    assert abs(result["tflops"] - case.flops / result["median_s"] / 1e12) < 1e-9


def test_sm80_impl_selects_the_mma_sync_forward(monkeypatch):
    monkeypatch.setenv("FASTATTN_CUDA_FORWARD", "auto")  # restored afterwards
    case = bench.Case(1, 128, 2, 2, 32, False, "float32", "fwd")
    bench._build("fastattn-cuda-sm80", case)
    assert os.environ["FASTATTN_CUDA_FORWARD"] == "mma_sync"
    assert "fastattn-cuda-sm80" in bench.PEERS["cuda"]
