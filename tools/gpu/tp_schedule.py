"""Compile tp_attention_block for 2- and 8-GPU topologies without those GPUs
and read the schedule XLA chose: the all-reduce start/done pairs and the
compute scheduled between each start and its done.

Two ways to get the devices (`--topology`):
  deviceless (default): `jax.experimental.topologies.get_topology_desc(
      platform="cuda", topology="1x1xN", target_config=...)` with the H100
      target config beside this script (h100_target_config.txtpb): XLA's GPU
      compiler compiles for N H100s with no GPU attached. Needs jax's CUDA
      plugin installed, not a GPU (on a machine without cuDNN the plugin's
      version check is skipped for this process).
  mock: jax's `jax_mock_gpu_topology` ("1xNx1") on a real GPU client with
      mock NCCL.
Each topology is compiled in a fresh process (this script runs itself).

    python tools/gpu/tp_schedule.py --out $OUT/tp_schedule.json [--check]
    python tools/gpu/tp_schedule.py --attention-backend xla --out s.json   # no CUDA build of ours
    python tools/gpu/tp_schedule.py --preset tiny --topology mock --out /tmp/s.json   # CPU dry run

Variants compiled per topology: "default" (no options), "lhs" (latency-hiding
scheduler only), "lhs_threshold0" (plus combiner threshold 0), "library"
(overlap_compiler_options("gpu"): also the combiner passes named off),
"library_o1" (that plus jax_optimization_level O1).
--check exits 1 unless "library" has, at every topology, one start/done pair
per chunk and compute between the start and done of every chunk but the last.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRESETS = {
    # d_model, q heads, kv heads, head dim, seq len, chunks; compile only, so
    # the shape need not fit anywhere.
    "full": dict(d_model=4096, heads=32, kv_heads=8, head_dim=128, seq_len=4096, num_chunks=4),
    "tiny": dict(d_model=64, heads=8, kv_heads=8, head_dim=16, seq_len=256, num_chunks=4),
}
COMPUTE_OPS = re.compile(r"\b(fusion|custom-call|convolution|dot|call|while|conditional)\(")
# What can hide an all-reduce: GEMMs (cuBLAS or Triton fusions, kind=kCustom),
# custom calls (our attention kernels), loops and conditionals (XLA's own
# attention, a ring step's per-device choice of block). Slices,
# pads and converts between a start and its done hide nothing.
HEAVY_OPS = re.compile(r"\b(custom-call|convolution|dot|while|conditional)\(|kind=kCustom")


def parse_schedule(hlo_text: str, collective: str = "all-reduce") -> dict:
    """Async `collective` pairs (all-reduce, collective-permute, ...) of the
    entry computation, in schedule order (compiled GPU modules are
    scheduled: instruction order is issue order)."""
    entry = hlo_text[hlo_text.index("ENTRY"):]
    lines = [line.strip() for line in entry.splitlines()[1:] if line.strip() and line.strip() != "}"]
    starts, pairs = {}, []
    for index, line in enumerate(lines):
        name = line.split(" = ")[0].removeprefix("ROOT").strip()
        if re.search(collective + r"-start\(", line):
            starts[name] = index
        match = re.search(collective + r"-done\((%[\w.\-]+)", line)
        if match and match.group(1) in starts:
            begin = starts[match.group(1)]
            between = [lines[i] for i in range(begin + 1, index) if COMPUTE_OPS.search(lines[i])]
            shape = re.search(collective + r"-start\(([^)]*)\)", lines[begin])
            heavy = sum(1 for b in between if HEAVY_OPS.search(b))
            pairs.append({"start_line": begin, "done_line": index, "compute_between": len(between),
                          "heavy_between": heavy,
                          "compute_ops_between": [b.split(" = ")[0] for b in between][:8],
                          "start": lines[begin][:200], "operands": shape.group(1)[:120] if shape else ""})
    sync_reduces = sum(1 for line in lines if re.search(r"\b" + collective + r"\(", line))
    excerpt = []
    if pairs:
        first, last = min(p["start_line"] for p in pairs), max(p["done_line"] for p in pairs)
        for line in lines[first:last + 1]:
            if collective in line or COMPUTE_OPS.search(line):
                excerpt.append(re.sub(r", metadata=\{.*", "", line)[:220])
    return {"pairs": pairs, "sync_all_reduces": sync_reduces, "excerpt": excerpt}


def progress(message: str) -> None:
    """A line on stderr as each stage starts: the parent keeps stderr's tail
    when the child runs out of time, so it shows where it stopped."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


TARGET_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "h100_target_config.txtpb")


def deviceless_devices(num_devices: int):
    """N H100s described, not attached: a topology XLA can compile for."""
    from jax.experimental import topologies
    with open(TARGET_CONFIG) as f:
        config = f.read()
    topology = topologies.get_topology_desc(platform="cuda", topology_name=f"h100x{num_devices}",
                                            topology=f"1x1x{num_devices}", target_config=config)
    return list(topology.devices)


def _mock_devices(num_devices: int, result: dict):
    """The GPU client with jax's mock topology of N devices (or, without a
    GPU, the host devices the parent asked for): the devices, or None with
    result["error"] set."""
    import jax
    progress(f"setting the mock topology for {num_devices} devices")
    try:
        try:
            jax.config.update("jax_mock_gpu_topology", f"1x{num_devices}x1")
            result["mock"] = f"jax_mock_gpu_topology=1x{num_devices}x1"
        except (AttributeError, KeyError, ValueError):
            # Older/newer spelling: N mock processes of the local devices.
            jax.config.update("mock_num_gpu_processes", num_devices)
            result["mock"] = f"mock_num_gpu_processes={num_devices}"
        progress("creating the client (jax.default_backend)")
        result["platform"] = jax.default_backend()
        result["device_count"] = jax.device_count()
        progress(f"client up: {result['device_count']} {result['platform']} device(s)")
    except Exception as error:  # noqa: BLE001 - record, do not die
        result["error"] = f"mock topology: {type(error).__name__}: {error}"
        return None
    if jax.device_count() != num_devices:
        result["error"] = (f"mock topology 1x{num_devices}x1 gave {jax.device_count()} {result['platform']} "
                           "device(s); the mock works on the GPU client only")
        return None
    if result["platform"] != "gpu":
        # Dry run on host devices (the parent sets their count): the same
        # compiles and parsing, with synchronous CPU collectives.
        result["note"] = "no GPU: compiled for host devices, not a mocked GPU topology"
    return jax.devices()


def _deviceless(num_devices: int, result: dict):
    progress(f"describing {num_devices} H100s (deviceless)")
    try:
        devices = deviceless_devices(num_devices)
    except Exception as error:  # noqa: BLE001 - record, do not die
        result["error"] = f"deviceless topology: {type(error).__name__}: {str(error)[:400]}"
        return None
    result.update(platform="gpu", device_count=len(devices), device_kind=devices[0].device_kind)
    return devices


def child(num_devices: int, preset: str, topology: str = "mock", attention_backend: str = "auto") -> dict:
    """Runs in its own process: make the devices, compile the variants."""
    import jax
    result = {"num_devices": num_devices, "variants": {}, "topology": topology,
              "attention_backend": attention_backend, "jax": jax.__version__}
    devices = (_deviceless if topology == "deviceless" else _mock_devices)(num_devices, result)
    if devices is None:
        return result

    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from jax_fastattn.parallel import tp_attention_block
    from jax_fastattn.parallel.tiling_allreduce import overlap_compiler_options

    shape = PRESETS[preset]
    mesh = Mesh(np.array(devices), ("model",))
    d, hq, hkv, dim, s = shape["d_model"], shape["heads"], shape["kv_heads"], shape["head_dim"], shape["seq_len"]
    replicated = NamedSharding(mesh, P())
    x = jax.ShapeDtypeStruct((1, s, d), jnp.bfloat16, sharding=replicated)
    params = {name: jax.ShapeDtypeStruct(dims, jnp.bfloat16, sharding=NamedSharding(mesh, spec)) for name, dims, spec in
              (("wq", (d, hq * dim), P(None, "model")), ("wk", (d, hkv * dim), P(None, "model")),
               ("wv", (d, hkv * dim), P(None, "model")), ("wo", (hq * dim, d), P("model", None)))}
    library = overlap_compiler_options("gpu")
    lhs = {"xla_gpu_enable_latency_hiding_scheduler": True}
    variants = {"default": ({}, None), "lhs": (lhs, None),
                "lhs_threshold0": ({**lhs, "xla_gpu_all_reduce_combine_threshold_bytes": 0}, None),
                "library": (library, None), "library_o1": (library, "O1")}
    result["options"] = {name: opts for name, (opts, _) in variants.items()}
    for name, (options, level) in variants.items():
        entry = {"optimization_level": level}
        try:
            if level:
                jax.config.update("jax_optimization_level", level)
            progress(f"compiling variant {name}")
            fn = jax.jit(lambda x, p: tp_attention_block(x, p, mesh=mesh, num_chunks=shape["num_chunks"],
                                                         num_heads=hq, num_kv_heads=hkv,
                                                         backend=attention_backend),
                         compiler_options=options or None)
            begin = time.perf_counter()
            text = fn.lower(x, params).compile().as_text()
            entry["compile_s"] = round(time.perf_counter() - begin, 2)
            entry.update(parse_schedule(text))
        except Exception as error:  # noqa: BLE001
            entry["error"] = f"{type(error).__name__}: {str(error)[:600]}"
        finally:
            if level:
                jax.config.update("jax_optimization_level", "UNKNOWN")
        result["variants"][name] = entry
    return result


def verdict(result: dict, num_chunks: int) -> str:
    entry = result.get("variants", {}).get("library", {})
    if "error" in result or "error" in entry:
        return "error: " + result.get("error", entry.get("error", ""))
    if result.get("platform") != "gpu":
        return "cpu dry run: " + f"{entry['sync_all_reduces']} synchronous all-reduces, no async pairs"
    pairs = entry["pairs"]
    if len(pairs) != num_chunks:
        return f"{len(pairs)} async all-reduce pairs, expected {num_chunks} ({entry['sync_all_reduces']} sync)"
    overlapped = sum(1 for pair in pairs if pair.get("heavy_between", pair["compute_between"]) > 0)
    if overlapped < num_chunks - 1:
        return (f"only {overlapped} of {num_chunks} pairs have a GEMM, kernel or loop between start and done")
    return "ok"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--devices", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--child-timeout", type=float, default=120.0,
                        help="seconds each topology's compile may take; a timeout is recorded with the child's stderr")
    parser.add_argument("--topology", choices=("deviceless", "mock"), default="deviceless")
    parser.add_argument("--attention-backend", default="auto",
                        help="flash_attention backend inside the block ('xla' where our CUDA kernels are not built)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.preset, args.topology, args.attention_backend)))
        return 0
    results = []
    for n in args.devices:
        # The host device count only matters for the CPU dry run.
        # Compile only: no preallocation, so it runs beside a process (pytest)
        # that already holds the GPU's memory.
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
               # Deviceless compiles need the CUDA plugin's compiler, not its
               # runtime libraries: on a machine without cuDNN its version
               # check would refuse to load it.
               **({"JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1"} if args.topology == "deviceless" else {}),
               "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}")}
        print(f"compiling for {n} {args.topology} devices (at most {args.child_timeout:.0f} s)", flush=True)
        try:
            run = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", str(n), "--preset",
                                  args.preset, "--out", args.out, "--topology", args.topology,
                                  "--attention-backend", args.attention_backend], capture_output=True, text=True,
                                 timeout=args.child_timeout, env=env)
            lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
            result = json.loads(lines[-1]) if lines else {"num_devices": n, "error": run.stderr[-2000:]}
        except subprocess.TimeoutExpired as error:
            stderr = error.stderr.decode(errors="replace") if isinstance(error.stderr, bytes) else (error.stderr or "")
            result = {"num_devices": n, "error": f"compile did not finish in {args.child_timeout:.0f} s; "
                                                 f"stderr tail: {stderr[-1500:]}"}
        except Exception as error:  # noqa: BLE001
            result = {"num_devices": n, "error": f"{type(error).__name__}: {error}"}
        result["verdict"] = verdict(result, PRESETS[args.preset]["num_chunks"])
        results.append(result)
    report = {"preset": args.preset, "shape": PRESETS[args.preset], "topology": args.topology,
              "attention_backend": args.attention_backend, "results": results}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"{'GPUs':>4} {'variant':>14} {'pairs':>5} {'sync':>4} {'ops (heavy) between start/done':>32}")
    for result in results:
        if "error" in result:
            print(f"{result['num_devices']:>4} {'-':>14} {result['error'][:200]}")
            continue
        for name, entry in result["variants"].items():
            if "error" in entry:
                print(f"{result['num_devices']:>4} {name:>14} error: {entry['error'][:150]}")
                continue
            between = ",".join(f"{p['compute_between']}({p['heavy_between']})" for p in entry["pairs"])
            print(f"{result['num_devices']:>4} {name:>14} {len(entry['pairs']):>5} {entry['sync_all_reduces']:>4} "
                  f"{between:>32}")
        print(f"     verdict ({result['num_devices']} GPUs, library options): {result['verdict']}")
    if args.check:
        return 0 if all(r["verdict"] == "ok" for r in results) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
