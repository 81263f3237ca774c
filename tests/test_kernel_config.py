"""Kernel choices (config.KernelConfig) reach the C++ handlers as typed FFI
attributes, never through the environment.

Without a GPU: the attribute mapping of ffi.CallAttrs, the custom calls
lowered for the CUDA platform (the attribute and its value in the MLIR
text), the CPU calls still running with a non-default config (XLA FFI
rejects attributes a handler does not declare), the C++ routing of
xla_ffi/cuda/kernel_choice.h against rules written down here, and no
kernel-choice getenv left in xla_ffi/. tools/gpu/kernel_config_check.py runs
every choice on a GPU."""
import ctypes
import os
import re
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_fastattn import config, ffi, masks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
XLA_FFI = os.path.join(ROOT, "xla_ffi")

# Which KernelConfig field each custom call takes, written out here rather
# than read from ffi.KERNEL_ATTRS.
EXPECTED_ATTRS = {
    "fastattn_forward_cpu": {"cpu_isa"},
    "fastattn_backward_cpu": {"cpu_isa"},
    "fastattn_forward_cuda": {"cuda_forward"},
    "fastattn_backward_cuda": {"cuda_backward"},
    "fastattn_forward_volta": {"volta_layout"},
}
KERNEL_FIELDS = ("cuda_forward", "cuda_backward", "volta_layout")
ALLOWED = {"cuda_forward": config.CUDA_FORWARD_KERNELS, "cuda_backward": config.CUDA_BACKWARD_KERNELS,
           "volta_layout": config.VOLTA_LAYOUTS}
# The C++ enums' codes (xla_ffi/cuda/kernel_choice.h), written out.
CODES = {"auto": 0, "wgmma": 1, "mma_sync": 2, "wgmma_ordered": 3, "wgmma_atomic": 4, "swizzled": 0, "naive": 1}
# The CPU level enum's codes (xla_ffi/cpu), written out.
CPU_ISA_CODES = {"auto": 0, "avx2": 1, "avx512": 2, "avx512_bf16": 3, "amx": 4}


def _attrs(kernel=config.DEFAULT):
    return ffi.CallAttrs(0.125, -masks.UNBOUNDED, 0, 64, 64, kernel=kernel)


def _cpp_enum_codes():
    """{enum name: {value name: code}} parsed from kernel_choice.h, value names
    turned from kMmaSync into mma_sync."""
    with open(os.path.join(XLA_FFI, "cuda", "kernel_choice.h")) as f:
        text = f.read()
    enums = {}
    for name, body in re.findall(r"enum class (\w+) : int32_t \{(.*?)\};", text, re.S):
        body = re.sub(r"//[^\n]*", "", body)
        values = re.findall(r"k(\w+) = (\d+)", body)
        enums[name] = {re.sub(r"(?<!^)([A-Z])", r"_\1", v).lower(): int(code) for v, code in values}
    return enums


def test_codes_cover_every_choice_and_match_the_cpp_enums():
    enums = _cpp_enum_codes()
    assert enums["KernelChoice"] == {name: CODES[name] for name in config.CUDA_BACKWARD_KERNELS}
    assert enums["VoltaLayout"] == {name: CODES[name] for name in ("swizzled", "naive")}
    assert ffi.KERNEL_CODES["cuda_backward"] == enums["KernelChoice"]
    # The forward takes the first three (the others are backward variants).
    assert ffi.KERNEL_CODES["cuda_forward"] == {name: CODES[name] for name in ("auto", "wgmma", "mma_sync")}
    for field in ("cuda_forward", "cuda_backward"):
        assert set(ffi.KERNEL_CODES[field]) == set(ALLOWED[field])
    assert ffi.KERNEL_CODES["volta_layout"] == enums["VoltaLayout"]
    assert set(ffi.KERNEL_CODES["volta_layout"]) == set(config.VOLTA_LAYOUTS)
    assert ffi.KERNEL_CODES["cuda_decode"] == enums["DecodeKernel"]
    assert set(ffi.KERNEL_CODES["cuda_decode"]) == set(config.CUDA_DECODE_KERNELS)


def _every_config():
    for forward in config.CUDA_FORWARD_KERNELS:
        for backward in config.CUDA_BACKWARD_KERNELS:
            for layout in config.VOLTA_LAYOUTS:
                for isa in config.CPU_ISAS:
                    yield config.KernelConfig(cuda_forward=forward, cuda_backward=backward, volta_layout=layout,
                                              cpu_isa=isa)


@pytest.mark.parametrize("target", sorted(EXPECTED_ATTRS))
def test_as_ffi_gives_each_call_exactly_its_own_choices(target):
    base = {"softmax_scale", "band_lo", "band_hi", "tile_q", "tile_kv"}
    for kernel in _every_config():
        attrs = _attrs(kernel).as_ffi(target)
        assert set(attrs) == base | EXPECTED_ATTRS[target], target
        for field in EXPECTED_ATTRS[target]:
            value = attrs[field]
            assert value.dtype == np.int32
            codes = CPU_ISA_CODES if field == "cpu_isa" else CODES
            assert int(value) == codes[getattr(kernel, field)]
    assert _attrs().as_ffi(target)["band_hi"] == 0


def test_call_attrs_default_and_bad_kernel():
    assert _attrs().kernel == config.DEFAULT
    assert hash(_attrs(config.KernelConfig(cuda_forward="wgmma"))) != hash(_attrs())
    with pytest.raises(ValueError, match="config must be a jax_fastattn.config.KernelConfig"):
        ffi.CallAttrs(0.125, 0, 0, 64, 64, kernel="wgmma")


def _forward_args(dtype=jnp.bfloat16, sq=128, hq=2, d=64):
    S = jax.ShapeDtypeStruct
    q = S((1, sq, hq, d), dtype)
    nq = nk = -(-sq // 64)
    return (q, q, q, S((0,), jnp.float32), S((0,), jnp.int32), S((0,), jnp.int32), S((0,), jnp.bool_),
            S((1, 1, nq, nk), jnp.int8))


def _lowered_text(fn, args, platform):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _backend_config(text, target):
    match = re.search(r"custom_call @" + target + r"\(.*?mhlo\.backend_config = \{([^}]*)\}", text)
    assert match, text[-3000:]
    return dict(item.strip().split(" = ") for item in match.group(1).split(","))


@pytest.mark.parametrize("choice", config.CUDA_FORWARD_KERNELS)
def test_lowered_cuda_forward_carries_cuda_forward(choice):
    kernel = config.KernelConfig(cuda_forward=choice, cuda_backward="mma_sync", volta_layout="naive")
    text = _lowered_text(ffi.forward_ffi("cuda", _attrs(kernel)), _forward_args(), "cuda")
    attrs = _backend_config(text, "fastattn_forward_cuda")
    assert attrs["cuda_forward"] == f"{CODES[choice]} : i32"
    assert "cuda_backward" not in attrs and "volta_layout" not in attrs


@pytest.mark.parametrize("choice", config.CUDA_BACKWARD_KERNELS)
def test_lowered_cuda_backward_carries_cuda_backward(choice):
    kernel = config.KernelConfig(cuda_forward="wgmma", cuda_backward=choice)
    q, k, v, bias, q_ids, kv_ids, dense, tiles = _forward_args()
    S = jax.ShapeDtypeStruct
    lse = S((1, 2, 128), jnp.float32)
    args = (q, k, v, q, lse, q, S((0,), jnp.float32), bias, q_ids, kv_ids, dense, tiles)
    text = _lowered_text(ffi.backward_ffi("cuda", _attrs(kernel)), args, "cuda")
    attrs = _backend_config(text, "fastattn_backward_cuda")
    assert attrs["cuda_backward"] == f"{CODES[choice]} : i32"
    assert "cuda_forward" not in attrs


@pytest.mark.parametrize("layout", config.VOLTA_LAYOUTS)
def test_lowered_volta_forward_carries_volta_layout(layout):
    kernel = config.KernelConfig(volta_layout=layout)
    attrs = ffi.CallAttrs(0.125, -masks.UNBOUNDED, 0, 128, 32, kernel=kernel)
    args = _forward_args(jnp.float16)[:7] + (jax.ShapeDtypeStruct((1, 1, 1, 4), jnp.int8),)
    text = _lowered_text(ffi.forward_ffi("volta", attrs), args, "cuda")
    assert _backend_config(text, "fastattn_forward_volta")["volta_layout"] == \
        f"{CODES[layout]} : i32"


def test_lowered_cpu_forward_carries_only_cpu_isa():
    kernel = config.KernelConfig(cuda_forward="mma_sync", volta_layout="naive", cpu_isa="avx2")
    text = _lowered_text(ffi.forward_ffi("cpu", _attrs(kernel)), _forward_args(jnp.float32), "cpu")
    attrs = _backend_config(text, "fastattn_forward_cpu")
    assert not set(attrs) & set(KERNEL_FIELDS)
    assert attrs["cpu_isa"] == f"{CPU_ISA_CODES['avx2']} : i32"


def _numpy_causal_attention(q, k, v, scale):
    """Plain numpy: [B, S, H, D], every query sees keys 0..i."""
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    s = q.shape[1]
    visible = np.arange(s)[None, :] <= np.arange(s)[:, None]
    logits = np.where(visible, logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", weights, v)


@pytest.mark.skipif(not ffi.library_available(), reason="needs the compiled library")
def test_cpu_calls_run_with_a_non_default_config():
    """The CPU handlers take no kernel choice; a config with every choice set
    must not put one on their calls (XLA would reject the call)."""
    kernel = config.KernelConfig(cuda_forward="mma_sync", cuda_backward="wgmma", volta_layout="naive")
    attrs = ffi.CallAttrs(0.25, -masks.UNBOUNDED, 0, 64, 128, kernel=kernel)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 64, 2, 16)).astype(np.float32) for _ in range(3))
    tiles = jnp.full((1, 1, 1, 1), 1, jnp.int8)  # partial: the kernel applies the band itself
    none_f, none_i = ffi.absent(), ffi.absent(jnp.int32)
    out, lse = jax.jit(ffi.forward_ffi("cpu", attrs))(q, k, v, none_f, none_i, none_i, ffi.absent(jnp.bool_),
                                                       tiles)
    np.testing.assert_allclose(np.asarray(out), _numpy_causal_attention(q, k, v, 0.25), rtol=2e-5, atol=2e-5)
    d_out = rng.standard_normal(q.shape).astype(np.float32)
    grads = jax.jit(ffi.backward_ffi("cpu", attrs))(q, k, v, out, lse, d_out, none_f, none_f, none_i, none_i,
                                                     ffi.absent(jnp.bool_), tiles)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads[:3])


def _expected_route(option, code, head_dim, has_d_bias, device):
    """The rule of issue 18: auto takes wgmma where it can run (head dim 64
    or 128, an sm90a device, and in the backward no bias gradient), else
    mma.sync; mma_sync always mma.sync; wgmma wgmma or an error naming the
    option; an unknown code an error."""
    can = head_dim in (64, 128) and device and not has_d_bias
    if code == 0:
        return "wgmma" if can else "mma_sync"
    if code == 2:
        return "mma_sync"
    if code == 1 or (code in (3, 4) and option == "cuda_backward"):
        return "wgmma" if can else "error"
    return "error"


# How the wgmma backward makes dQ (KernelChoice code, has the dQ workspace):
# wgmma takes the second pass, auto the ordered one-pass kernel where it has
# the workspace (else the second pass); wgmma_ordered and wgmma_atomic need
# the workspace.
EXPECTED_DQ = {(0, False): "separate_pass", (0, True): "fused_ordered", (1, False): "separate_pass",
               (1, True): "separate_pass", (3, False): "error", (3, True): "fused_ordered",
               (4, False): "error", (4, True): "fused_atomic"}


NAMES = {1: "wgmma", 3: "wgmma_ordered", 4: "wgmma_atomic"}


def expected_named(option, code):
    """Codes 3 and 4 are backward variants: the forward knows no such code."""
    return code == 1 or option == "cuda_backward"


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_cpp_routing_follows_the_choice(tmp_path):
    binary = tmp_path / "kernel_choice_test"
    subprocess.run(["g++", "-std=c++17", "-O0", "-I", XLA_FFI, os.path.join(XLA_FFI, "tests", "kernel_choice_test.cc"),
                    "-o", str(binary)], check=True, capture_output=True)
    lines = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout.splitlines()
    dq_lines = [line for line in lines if line.startswith("dq ")]
    lines = [line for line in lines if not line.startswith("dq ")]
    assert len(lines) == (1 + 2) * 6 * 4 * 2  # forward: no bias gradient; 6 codes, 4 head dims, 2 devices
    assert len(dq_lines) == len(EXPECTED_DQ)
    for line in dq_lines:
        head, result = line.split(" -> ", 1)
        _, code, has_workspace = head.split()
        expected = EXPECTED_DQ[int(code), has_workspace == "1"]
        if expected == "error":
            assert result.startswith("error: KernelConfig.cuda_backward='wgmma") and "dQ workspace" in result, line
        else:
            assert result == expected, line
    for line in lines:
        head, result = line.split(" -> ", 1)
        option, code, head_dim, has_d_bias, device = head.split()
        code, head_dim, has_d_bias, device = int(code), int(head_dim), has_d_bias == "1", device == "1"
        expected = _expected_route(option, code, head_dim, has_d_bias, device)
        if expected != "error":
            assert result == expected, line
            continue
        assert result.startswith("error: KernelConfig." + option), line
        if code in (1, 3, 4) and expected_named(option, code):  # the reason names what is missing
            assert f"'{NAMES[code]}' cannot run this call" in result, line
            if head_dim not in (64, 128):
                assert f"head_dim 64 or 128, got {head_dim}" in result, line
            elif option == "cuda_backward" and has_d_bias:
                assert "bias gradient" in result, line
            else:
                assert "compute capability 9.0" in result, line
        else:
            assert f"no kernel with code {code}" in result, line


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_attributes_decode_into_the_cpp_enums(tmp_path):
    """The int32 attributes as_ffi gives arrive in C++ as the enums' values,
    through the same decoding the CUDA handlers register (a CPU handler that
    echoes them)."""
    library = tmp_path / "kernel_choice_attr_test.so"
    subprocess.run(["g++", "-std=c++17", "-O0", "-shared", "-fPIC", "-isystem", jax.ffi.include_dir(), "-I", XLA_FFI,
                    os.path.join(XLA_FFI, "tests", "kernel_choice_attr_test.cc"), "-o", str(library)],
                   check=True, capture_output=True)
    handler = ctypes.cdll.LoadLibrary(str(library)).FastattnKernelChoiceEcho
    jax.ffi.register_ffi_target("fastattn_kernel_choice_echo", jax.ffi.pycapsule(handler), platform="cpu")
    echo = jax.ffi.ffi_call("fastattn_kernel_choice_echo", jax.ShapeDtypeStruct((2,), jnp.int32))
    for forward in config.CUDA_FORWARD_KERNELS:
        for layout in config.VOLTA_LAYOUTS:
            kernel = config.KernelConfig(cuda_forward=forward, volta_layout=layout)
            attrs = {**_attrs(kernel).as_ffi("fastattn_forward_cuda"), **_attrs(kernel).as_ffi("fastattn_forward_volta")}
            codes = jax.jit(lambda: echo(cuda_forward=attrs["cuda_forward"], volta_layout=attrs["volta_layout"]))()
            assert np.asarray(codes).tolist() == [CODES[forward], CODES[layout]]
    with pytest.raises(Exception, match="expected S32 but got S64"):  # the enums are int32
        jax.block_until_ready(echo(cuda_forward=np.int64(1), volta_layout=np.int32(0)))
    # Why as_ffi gives each call only its own choices:
    with pytest.raises(Exception, match="Wrong number of attributes"):
        jax.block_until_ready(echo(cuda_forward=np.int32(1), volta_layout=np.int32(0), cuda_backward=np.int32(0)))


def _sources():
    for folder, _, files in os.walk(XLA_FFI):
        for name in files:
            if name.endswith((".cc", ".cu", ".h")):
                path = os.path.join(folder, name)
                with open(path) as f:
                    yield os.path.relpath(path, ROOT), f.read()


def test_no_kernel_choice_is_read_from_the_environment():
    for path, text in _sources():
        assert "getenv" not in text, path
        for variable in ("FASTATTN_CUDA_FORWARD", "FASTATTN_CUDA_BACKWARD", "FASTATTN_VOLTA_LAYOUT"):
            assert variable not in text, (path, variable)


def test_one_dispatch_place_routes_between_sm90_and_sm80():
    """The sm80 and sm90 launchers do not call into each other; only
    dispatch.cc names both families' launches."""
    launches = ("attention_forward_wgmma", "attention_forward_mma_sync", "attention_backward_wgmma",
                "attention_backward_mma_sync")
    files = {}  # launch -> the source files that define or call it
    for path, text in _sources():
        if path.endswith(".h") or "tests" in path:
            continue
        for name in launches:
            if re.search(r"\b" + name + r"\(", text):
                files.setdefault(name, set()).add(os.path.basename(path))
    assert files == {
        "attention_forward_wgmma": {"attention_sm90.cu", "dispatch.cc"},
        "attention_forward_mma_sync": {"attention_sm80.cu", "dispatch.cc"},
        "attention_backward_wgmma": {"attention_backward_sm90.cu", "dispatch.cc"},
        "attention_backward_mma_sync": {"attention_backward_sm80.cu", "dispatch.cc"},
    }


@pytest.mark.parametrize("choice", config.CUDA_BACKWARD_KERNELS)
@pytest.mark.parametrize("sm90", [False, True])
def test_backward_dq_workspace_only_for_the_one_pass_kernels(monkeypatch, choice, sm90):
    """The one-pass wgmma backward's dQ workspace (float32 [B, Hq, q tiles *
    64 * D] and int32 [B, Hq, q tiles]) is allocated where it was asked for
    ("auto" takes the ordered one-pass kernel) on an sm90 device, and is
    empty otherwise (no memory for a kernel that does not run)."""
    monkeypatch.setattr(ffi, "cuda_devices_run_wgmma", lambda: sm90)
    kernel = config.KernelConfig(cuda_backward=choice)
    q, k, v, bias, q_ids, kv_ids, dense, tiles = _forward_args(sq=130)
    S = jax.ShapeDtypeStruct
    args = (q, k, v, q, S((1, 2, 130), jnp.float32), q, S((0,), jnp.float32), bias, q_ids, kv_ids, dense, tiles)
    results = jax.eval_shape(ffi.backward_ffi("cuda", _attrs(kernel)), *args)
    assert len(results) == 7
    fused = sm90 and choice in ("auto", "wgmma_ordered", "wgmma_atomic")
    assert results[5].shape == (1, 2, 3 * 64 * 64 if fused else 0) and results[5].dtype == jnp.float32
    assert results[6].shape == (1, 2, 3 if fused else 0) and results[6].dtype == jnp.int32
    assert not ffi.fused_dq_workspace(kernel, 256, False) and not ffi.fused_dq_workspace(kernel, 64, True)
