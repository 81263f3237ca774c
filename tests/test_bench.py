"""`python -m jax_fastattn.bench` on the CPU: what the worker times is the
attention of the case it was given (its output and gradients against a numpy
reference written here, XLA's own FLOP count against Case.flops), the timing
method waits for the work it times and orders a slower implementation after
a faster one, our sm80 peer selects its kernels through KernelConfig, torch's
forward + backward leaves `.grad` alone, and a missing peer is skipped."""
import threading
import time

import numpy as np
import pytest

from jax_fastattn import bench
from jax_fastattn.bench import jax_peers, torch_peers


def numpy_attention(q, k, v, causal):
    """Plain softmax attention of one batch row, loops over heads:
    q [S, Hq, D], k/v [S, Hkv, D] (float64). Returns out [S, Hq, D] and the
    probabilities P [Hq, S, S]."""
    seq, heads, dim = q.shape
    group = heads // k.shape[1]
    out = np.zeros_like(q)
    probs = np.zeros((heads, seq, seq))
    for h in range(heads):
        logits = q[:, h] @ k[:, h // group].T / np.sqrt(dim)
        if causal:
            logits[np.triu(np.ones((seq, seq), bool), 1)] = -np.inf
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        probs[h] = p
        out[:, h] = p @ v[:, h // group]
    return out, probs


def numpy_grads(q, k, v, dout, causal):
    """dq and dv of sum(out * dout) for one batch row, by hand:
    dP = dO V^T, dS = P * (dP - rowsum(dP * P)), dQ = scale dS K, dV = P^T dO."""
    _, probs = numpy_attention(q, k, v, causal)
    heads, dim = q.shape[1], q.shape[2]
    group = heads // k.shape[1]
    dq, dv = np.zeros_like(q), np.zeros_like(v)
    for h in range(heads):
        p = probs[h]
        dp = dout[:, h] @ v[:, h // group].T
        ds = p * (dp - (dp * p).sum(axis=1, keepdims=True))
        dq[:, h] = ds @ k[:, h // group] / np.sqrt(dim)
        dv[:, h // group] += p.T @ dout[:, h]
    return dq, dv


def _last_row(inputs, name):
    return np.asarray(inputs[name][-1], np.float64)


@pytest.mark.parametrize("causal", [True, False])
def test_worker_times_the_attention_of_its_case(causal):
    case = bench.Case(2, 48, 4, 2, 16, causal, "float32", "fwd")
    result = bench.run_worker("fastattn-xla", case, 5)
    inputs = bench.make_inputs(case)
    out, _ = numpy_attention(*(_last_row(inputs, n) for n in "qkv"), causal)
    expected = bench.probe(case, out[None])
    np.testing.assert_allclose(result["probe"], expected, atol=2e-5, rtol=1e-4)
    assert len(result["times_s"]) == 5 and result["median_s"] > 0
    assert result["median_s"] == pytest.approx(float(np.median(result["times_s"])))
    assert result["tflops"] == pytest.approx(case.flops / result["median_s"] / 1e12)


def test_forward_backward_worker_returns_the_gradients():
    case = bench.Case(1, 40, 4, 2, 16, True, "float32", "fwd_bwd")
    result = bench.run_worker("fastattn-xla", case, 5)
    inputs = bench.make_inputs(case)
    dq, dv = numpy_grads(*(_last_row(inputs, n) for n in ("q", "k", "v", "dout")), True)
    np.testing.assert_allclose(result["probe"], bench.probe(case, dq[None], dv[None]), atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("mode, low, high", [("fwd", 0.9, 1.4), ("fwd_bwd", 0.7, 1.3)])
def test_xla_flop_count_of_the_timed_function_matches_case_flops(mode, low, high):
    # The reference is plain dots, so XLA counts its FLOPs: a forward timed in
    # place of forward + backward would be at 2/7 of Case.flops.
    case = bench.Case(1, 128, 2, 2, 32, False, "float32", mode)
    result = bench.run_worker("reference", case, 5)
    assert low < result["xla_flops"] / case.flops < high


class FakeDevice:
    """An asynchronous device: dispatch returns at once, the work runs on one
    queue thread; wait blocks until the given results (or, given none,
    everything queued) are done."""

    def __init__(self, seconds_per_call):
        self.seconds = seconds_per_call
        self.lock = threading.Lock()
        self.pending = []

    def dispatch(self):
        done = threading.Event()
        with self.lock:
            previous = self.pending[-1] if self.pending else None
            self.pending.append(done)

        def work():
            if previous is not None:
                previous.wait()
            time.sleep(self.seconds)
            done.set()
        threading.Thread(target=work, daemon=True).start()
        return done

    def wait(self, results):
        for event in results or list(self.pending):
            event.wait()


def test_timing_waits_for_the_device_and_orders_slower_after_faster():
    fast, slow = FakeDevice(0.002), FakeDevice(0.008)
    _, fast_median = bench.sample_seconds(fast.dispatch, fast.wait, 5, calls=4)
    times, slow_median = bench.sample_seconds(slow.dispatch, slow.wait, 5, calls=4)
    assert len(times) == 5
    assert 0.002 <= fast_median < slow_median
    assert 0.008 <= slow_median < 0.03  # per call, not per sample of 4
    # Not waiting would time only the dispatch.
    _, unsynced = bench.sample_seconds(slow.dispatch, lambda _: None, 5, calls=4)
    assert unsynced < 0.004
    slow.wait([])


def test_a_larger_case_takes_longer():
    small = bench.run_worker("reference", bench.Case(1, 64, 2, 2, 32, False, "float32", "fwd"), 5)
    large = bench.run_worker("reference", bench.Case(1, 1024, 2, 2, 32, False, "float32", "fwd"), 5)
    assert large["median_s"] > 4 * small["median_s"]  # 256x the FLOPs


def test_sm80_peer_selects_the_mma_sync_kernels_through_kernel_config(monkeypatch):
    import jax.numpy as jnp

    import jax_fastattn
    from jax_fastattn.config import KernelConfig

    calls = []
    monkeypatch.setattr(jax_fastattn, "flash_attention", lambda q, k, v, **kwargs: calls.append(kwargs) or q)
    case = bench.Case(1, 16, 2, 2, 8, True, "float32", "fwd")
    x = jnp.zeros((1, 16, 2, 8))
    jax_peers.attention_fn("fastattn-cuda-sm80", case)(x, x, x)
    jax_peers.attention_fn("fastattn-cuda", case)(x, x, x)
    assert calls[0] == {"causal": True, "backend": "cuda",
                        "config": KernelConfig(cuda_forward="mma_sync", cuda_backward="mma_sync")}
    assert calls[1] == {"causal": True, "backend": "cuda"}
    assert "fastattn-cuda-sm80" in bench.PEERS["cuda"]


def test_torch_forward_backward_step_leaves_grad_alone():
    torch = pytest.importorskip("torch")
    q, k, v = (torch.randn(1, 8, 2, 4, requires_grad=True) for _ in range(3))
    dout = torch.randn(1, 8, 2, 4)
    attend = lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2), -1) @ v
    step = torch_peers.step_fn(attend, q, k, v, dout)
    first, second = step(), step()
    assert q.grad is None and k.grad is None and v.grad is None
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b)  # no accumulation from step to step


def test_missing_peer_is_skipped_and_named(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(bench.cli.OPTIONAL_MODULES, "fake-peer", "no_such_module_for_bench_tests")
    assert "no_such_module_for_bench_tests" in bench.missing_peer("fake-peer")
    assert bench.missing_peer("fastattn-xla") is None
    bench.main(["--seq", "16", "--impls", "fake-peer", "--out", str(tmp_path)])
    assert "peer missing: fake-peer" in capsys.readouterr().err
    assert (tmp_path / "results.json").exists()


def test_budget_skips_the_workers_it_leaves_no_time_for(tmp_path):
    import json
    bench.main(["--seq", "16", "32", "--impls", "fastattn-xla", "--budget", "1e-6", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert len(results) == 2 and all(r["error"].startswith("skipped: past --budget") for r in results)
    assert not (tmp_path / "results.partial.json").exists()


@pytest.mark.parametrize("dtype, mode", [("bfloat16", "fwd_bwd"), ("float32", "decode")])
def test_inputs_are_shared_through_the_folder_bit_for_bit(tmp_path, dtype, mode):
    case = bench.Case(2, 24, 4, 2, 8, True, dtype, mode)
    drawn = bench.make_inputs(case, str(tmp_path))
    assert len(list(tmp_path.iterdir())) == 1  # written whole, no temporary left
    read = bench.make_inputs(case, str(tmp_path))
    assert sorted(read) == sorted(drawn)
    for name in drawn:
        assert read[name].dtype == drawn[name].dtype and read[name].shape == drawn[name].shape
        np.testing.assert_array_equal(read[name].view(np.uint8), drawn[name].view(np.uint8))
    np.testing.assert_array_equal(bench.make_inputs(case)["k"].astype(np.float32), drawn["k"].astype(np.float32))
