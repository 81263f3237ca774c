"""`python -m jax_fastattn.bench` on the CPU: what the worker times is the
attention of the case it was given (its output and gradients against a numpy
reference written here, XLA's own FLOP count against Case.flops), the timing
method waits for the work it times and orders a slower implementation after
a faster one, our sm80 peer selects its kernels through KernelConfig, torch's
forward + backward leaves `.grad` alone, and a missing peer is skipped.
Interleaved CPU runs: the samples alternate round-robin and each is charged
to its own implementation, torch's CPU SDPA peer computes the attention of
the case, the float64 probe matches numpy, a run without torch names the
missing peer and times the others, --threads pins the worker's CPUs."""
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from jax_fastattn import bench
from jax_fastattn.bench import cpu_interleaved, jax_peers, timing, torch_peers


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


def test_backward_variant_peers_select_their_kernel_through_kernel_config(monkeypatch):
    """fastattn-cuda-two-pass / -ordered / -atomic time the three sm90
    backwards by name, beside the default (fastattn-cuda, no config)."""
    import jax.numpy as jnp

    import jax_fastattn
    from jax_fastattn.config import KernelConfig

    calls = []
    monkeypatch.setattr(jax_fastattn, "flash_attention", lambda q, k, v, **kwargs: calls.append(kwargs) or q)
    case = bench.Case(1, 16, 2, 2, 8, True, "float32", "fwd")
    x = jnp.zeros((1, 16, 2, 8))
    expected = {"fastattn-cuda-two-pass": "wgmma", "fastattn-cuda-ordered": "wgmma_ordered",
                "fastattn-cuda-atomic": "wgmma_atomic"}
    for name in expected:
        jax_peers.attention_fn(name, case)(x, x, x)
        assert name in bench.PEERS["cuda"]
    assert [c["config"] for c in calls] == [KernelConfig(cuda_backward=v) for v in expected.values()]


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


class FakeClock:
    """A clock that moves only when a fake implementation runs."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def fake_impls(clock, seconds, log):
    """name -> (dispatch, wait): dispatching `name` logs it and advances the
    clock by seconds[name]."""
    def dispatch_of(name):
        def dispatch():
            log.append(name)
            clock.now += seconds[name]
            return name
        return dispatch
    return {name: (dispatch_of(name), lambda _: None) for name in seconds}


def test_interleaved_samples_alternate_and_are_charged_to_their_own_implementation():
    clock, log = FakeClock(), []
    seconds = {"ours": 1.0, "xla": 7.0, "torch": 3.0}
    times, order = timing.interleaved_samples(fake_impls(clock, seconds, log), 4, clock=clock)
    assert log == order and len(order) == 12
    rounds = [order[i:i + 3] for i in range(0, 12, 3)]
    assert all(sorted(r) == sorted(seconds) for r in rounds)  # every round times each once
    assert [r[0] for r in rounds] == ["ours", "xla", "torch", "ours"]  # the first one rotates
    assert all(a != b for a, b in zip(order, order[1:]))  # never the same one twice in a row
    assert times == {name: [t] * 4 for name, t in seconds.items()}


def test_interleaved_samples_lead_in_runs_each_untimed_call_before_its_own_sample():
    clock, log = FakeClock(), []
    seconds = {"ours": 1.0, "torch": 3.0}
    times, order = timing.interleaved_samples(fake_impls(clock, seconds, log), 3, clock=clock, lead_in=True)
    assert log == [name for name in order for _ in range(2)]  # each sample: its own lead-in call, then the timed one
    assert times == {name: [t] * 3 for name, t in seconds.items()}  # lead-in calls are not charged


def test_exact_probe_is_numpy_attention_of_the_probed_rows():
    for causal in (True, False):
        case = bench.Case(2, 40, 4, 2, 8, causal, "float32", "fwd")
        inputs = bench.make_inputs(case)
        out, _ = numpy_attention(*(_last_row(inputs, n) for n in "qkv"), causal)
        np.testing.assert_allclose(bench.cases.exact_probe(case, inputs), bench.probe(case, out[None]), atol=1e-12)


def test_time_case_times_the_prepared_implementations_interleaved_and_keeps_a_failure_apart():
    case = bench.Case(1, 32, 2, 2, 8, True, "float32", "fwd")
    inputs = bench.make_inputs(case)
    out, _ = numpy_attention(*(_last_row(inputs, n) for n in "qkv"), True)
    clock, log = FakeClock(), []
    seconds = {"right": 2.0, "off": 5.0}
    impls = fake_impls(clock, seconds, log)
    outputs = {"right": out[None], "off": out[None] + 0.5}

    def prepare(name, case, host):
        if name == "broken":
            raise RuntimeError("no kernel for this case")
        dispatch, wait = impls[name]
        return dispatch, wait, lambda result: bench.probe(case, outputs[result]), 0.0

    results = cpu_interleaved.time_case(case, 6, ["right", "broken", "off"], inputs, prepare, clock)
    assert [r["impl"] for r in results] == ["right", "broken", "off"]
    assert "no kernel for this case" in results[1]["error"] and "median_s" not in results[1]
    assert log[:2] == ["right", "off"]  # warm-ups, then the rounds
    # The rounds: each timed call right after an untimed one of the same implementation.
    assert log[2:] == [name for name in timing.round_robin_order(["right", "off"], 6) for _ in range(2)]
    assert results[0]["median_s"] == 2.0 and results[2]["median_s"] == 5.0
    assert results[0]["max_abs_err_f64"] < 1e-6
    assert results[2]["max_abs_err_f64"] == pytest.approx(0.5, abs=1e-6)


def test_issue32_preset_is_the_grid_of_the_issue():
    plan = cpu_interleaved.preset_plan("cpu-issue32")
    forward = {(c.dtype, c.causal, c.seq, c.head_dim) for c, _ in plan if c.mode == "fwd"}
    assert forward == {(d, causal, s, h) for d in ("float32", "bfloat16") for causal in (True, False)
                       for s in (1024, 4096, 8192) for h in (64, 128)}
    assert len(plan) == 28 and all(c.batch == 1 and c.heads == c.kv_heads == 8 for c, _ in plan)
    assert [c for c, _ in plan if c.mode == "fwd_bwd"] == [
        bench.Case(1, 2048, 8, 8, 64, True, "float32", "fwd_bwd"), bench.Case(1, 2048, 8, 8, 128, True, "float32", "fwd_bwd"),
        bench.Case(1, 2048, 8, 8, 64, False, "float32", "fwd_bwd"), bench.Case(1, 2048, 8, 8, 64, True, "bfloat16", "fwd_bwd")]
    assert min(n for _, n in plan) >= 5
    with pytest.raises(ValueError, match="--preset"):
        cpu_interleaved.preset_plan("cpu-nope")


def test_cpu_info_reads_the_model_and_isa_flags(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nmodel name\t: Some CPU @ 2GHz\nflags\t\t: fpu avx2 avx512f amx_tile\n\n"
                    "processor\t: 1\nmodel name\t: Other\nflags\t\t: fpu\n")
    info = cpu_interleaved.cpu_info(str(path))
    assert info["model"] == "Some CPU @ 2GHz"
    assert info["isa"] == {"avx2": True, "avx512f": True, "avx512_bf16": False, "amx_bf16": False, "amx_tile": True}
    with pytest.raises(ValueError, match="--threads"):
        cpu_interleaved.pin_threads(0)
    with pytest.raises(ValueError, match="--threads"):
        cpu_interleaved.pin_threads(len(os.sched_getaffinity(0)) + 1)


@pytest.mark.parametrize("dtype, mode, gqa", [("float32", "fwd", True), ("bfloat16", "fwd", False),
                                              ("float32", "fwd_bwd", False)])
def test_torch_cpu_sdpa_peer_computes_the_attention_of_its_case(dtype, mode, gqa):
    pytest.importorskip("torch")
    case = bench.Case(1, 56, 4, 2 if gqa else 4, 16, True, dtype, mode)
    inputs = bench.make_inputs(case)
    step, probe_of = torch_peers.prepare("torch-sdpa-cpu", case, inputs)
    rows = {n: _last_row(inputs, n) for n in inputs}
    if mode == "fwd":
        expected = bench.probe(case, numpy_attention(rows["q"], rows["k"], rows["v"], True)[0][None])
    else:
        dq, dv = numpy_grads(rows["q"], rows["k"], rows["v"], rows["dout"], True)
        expected = bench.probe(case, dq[None], dv[None])
    tolerance = 2e-2 if dtype == "bfloat16" else 1e-4
    np.testing.assert_allclose(probe_of(step()), expected, atol=tolerance, rtol=tolerance)


def _bench_subprocess(tmp_path, *args):
    proc = subprocess.run([sys.executable, "-m", "jax_fastattn.bench", *args, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((tmp_path / "results.json").read_text()), proc


def test_interleaved_run_pins_its_threads_and_records_the_machine(tmp_path):
    data, _ = _bench_subprocess(tmp_path, "--interleave", "--seq", "40", "--heads", "2", "--head-dim", "8",
                                "--threads", "1")
    assert data["threads"] == 1 and data["affinity"] == [min(os.sched_getaffinity(0))]
    assert set(data["cpu"]["isa"]) == set(cpu_interleaved.ISA_FLAGS) and data["versions"]["jax"]
    by_impl = {r["impl"]: r for r in data["results"]}
    assert list(by_impl) == cpu_interleaved.CPU_PEERS
    for name in ("fastattn-cpu", "jax.nn-xla"):
        assert len(by_impl[name]["times_s"]) == 5 and by_impl[name]["max_abs_err_f64"] < 1e-5
    if "torch" in data["versions"]:
        assert data["torch_threads"] == 1 and by_impl["torch-sdpa-cpu"]["max_abs_err_f64"] < 1e-5
    else:
        assert by_impl["torch-sdpa-cpu"]["error"].startswith("peer missing")


def test_without_torch_the_peer_is_named_missing_and_the_others_run(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now fails; find_spec says absent
    assert bench.missing_peer("torch-sdpa-cpu") == "no module named torch"
    bench.main(["--interleave", "--seq", "24", "--heads", "2", "--head-dim", "8", "--out", str(tmp_path)])
    assert "peer missing: torch-sdpa-cpu (no module named torch)" in capsys.readouterr().err
    results = {r["impl"]: r for r in json.loads((tmp_path / "results.json").read_text())["results"]}
    assert results["torch-sdpa-cpu"]["error"] == "peer missing: no module named torch"
    assert results["fastattn-cpu"]["median_s"] > 0 and results["jax.nn-xla"]["median_s"] > 0
