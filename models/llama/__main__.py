"""`python -m models.llama`: prefill and decode throughput of a Llama model.

    python -m models.llama --config tiny --batch 4 --prompt-len 512 --gen 64 \\
        [--mesh 2x4] [--attention fastattn|cudnn|xla] [--dtype bfloat16] \\
        [--checkpoint DIR] [--temperature 0.8 --top-k 40 --top-p 0.95] [--json out.json] \\
        [--context-parallel N] [--kv-cache device|host|auto [--device-kv-tokens N]]

Random weights unless --checkpoint names a Hugging Face safetensors folder.
Prompts are random tokens; with --ragged their lengths are drawn in
[prompt-len / 2, prompt-len]. Prefill and decode are compiled ahead of time,
then each runs once and is timed on its own: prefill tokens/s = B * P /
prefill time; decode makes gen - 1 steps (the first new token comes from the
prefill logits): decode tokens/s = B * (gen - 1) / decode time, ms/token =
decode time / (gen - 1).

--context-parallel N splits the prefill's sequence over N devices (ring or
all-gather attention, models.llama.sharding.make_cp_mesh); decode then runs
on the first device. --kv-cache host|auto keeps the prompt's positions
beyond what device memory holds in host memory (jax_fastattn.offload;
--device-kv-tokens N forces N prompt positions per layer on the device):
the decode loop is then stepped from the host, and its time includes the
per-step dispatch.
"""
from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from jax_fastattn.nn import IMPLEMENTATIONS

from . import generation, host_cache, runtime, sharding
from .checkpoint import load_safetensors
from .config import PRESETS, LlamaConfig
from .model import LAYER_STORAGE


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m models.llama", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--checkpoint", default=None, help="HF safetensors file or folder (config.json beside it)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen", type=int, default=64, help="new tokens per row")
    p.add_argument("--ragged", action="store_true", help="random prompt lengths in [P/2, P]")
    p.add_argument("--mesh", default=None, help="DATAxMODEL, e.g. 2x4")
    p.add_argument("--attention", default="fastattn", choices=IMPLEMENTATIONS)
    p.add_argument("--dtype", default=None, choices=sorted(runtime.DTYPES),
                   help="default bfloat16 on GPU, float32 on CPU")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--context-parallel", type=int, default=1, help="prefill sequence split over N devices")
    p.add_argument("--kv-cache", default="device", choices=host_cache.KV_CACHE_MODES)
    p.add_argument("--device-kv-tokens", type=int, default=None,
                   help="with --kv-cache host|auto: prompt positions per layer kept on the device")
    p.add_argument("--layer-storage", default="per_layer", choices=LAYER_STORAGE,
                   help="decoder layers stacked and scanned, or one buffer per layer in a Python loop")
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    for name in ("batch", "prompt_len", "gen", "context_parallel"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    dtype_name = args.dtype or ("bfloat16" if jax.default_backend() == "gpu" else "float32")
    dtype = runtime.DTYPES[dtype_name]
    mesh = sharding.make_mesh(args.mesh) if args.mesh else None
    sharding.check_mesh(mesh, args.batch)
    cp_mesh = sharding.make_cp_mesh(args.context_parallel) if args.context_parallel > 1 else None
    if (cp_mesh is not None or args.kv_cache != "device") and mesh is not None:
        raise ValueError("--mesh cannot be combined with --context-parallel or --kv-cache host|auto")
    options = host_cache.HostCacheOptions(device_tokens=args.device_kv_tokens)
    stages = tqdm(total=5, desc="llama", unit="stage", file=sys.stderr)

    stages.set_postfix_str("weights")
    if args.checkpoint:
        model = load_safetensors(args.checkpoint, attention=args.attention, dtype=dtype, param_dtype=dtype,
                                 layer_storage=args.layer_storage)
        cfg = model.cfg
        graphdef, state = nnx.split(model)
        if mesh is not None:
            state = jax.device_put(state, sharding.param_shardings(state, cfg, mesh))
    else:
        cfg = LlamaConfig.preset(args.config)
        graphdef, _ = runtime.graphdef_for(cfg, args.attention, dtype, layer_storage=args.layer_storage)
        state = runtime.random_state(cfg, dtype, args.seed, mesh, layer_storage=args.layer_storage)
    stages.update()

    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(0, cfg.vocab_size, (args.batch, args.prompt_len), dtype=np.int32)
    lengths = (rng.integers(max(1, args.prompt_len // 2), args.prompt_len + 1, args.batch) if args.ragged
               else np.full(args.batch, args.prompt_len)).astype(np.int32)
    prompts, lengths = runtime.batch_put(mesh, jnp.asarray(prompts), jnp.asarray(lengths))
    offloaded = args.kv_cache != "device"
    max_len = args.prompt_len + (0 if offloaded else args.gen)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, stop_tokens=())
    key = jax.random.key(args.seed)
    extra = {}

    stages.set_postfix_str("compile prefill")
    prefill = runtime.compile_prefill(graphdef, state, prompts, lengths, max_len, mesh, cp_mesh)
    stages.update()
    stages.set_postfix_str("prefill")
    (logits, k_cache, v_cache), prefill_s = runtime.timed(prefill, state, prompts, lengths)
    if cp_mesh is not None:
        (logits, k_cache, v_cache), extra["to_one_device_s"] = runtime.timed(
            generation.to_one_device, logits, k_cache, v_cache)
    stages.update()
    if offloaded:
        sample_fn = lambda lg, k: generation.sample(lg, k, args.temperature, args.top_k, args.top_p)  # noqa: E731
        loop = dict(options=options, sample_fn=sample_fn, stop=jnp.asarray((-1,), jnp.int32), pad_id=0)

        def placed():
            return host_cache.place(cfg, k_cache, v_cache, lengths, args.gen, mode=args.kv_cache, options=options)

        stages.set_postfix_str("compile decode")
        device_parts, host_parts, plan = placed()
        host_cache.decode_loop(graphdef, state, logits, device_parts, host_parts, lengths, key, 2, **loop)
        stages.update()
        stages.set_postfix_str("decode")
        (device_parts, host_parts, plan), extra["place_s"] = runtime.timed(placed)
        tokens, decode_s = runtime.timed(lambda: host_cache.decode_loop(
            graphdef, state, logits, device_parts, host_parts, lengths, key, args.gen, **loop))
        extra["plan"] = str(plan)
        print(plan, file=sys.stderr)
    else:
        stages.set_postfix_str("compile decode")
        decode = runtime.compile_decode(graphdef, state, logits, k_cache, v_cache, lengths, key, args.gen, mesh,
                                        **sampling)
        stages.update()
        stages.set_postfix_str("decode")
        (tokens, _, _), decode_s = runtime.timed(decode, state, logits, k_cache, v_cache, lengths, key)
    stages.update()
    stages.close()

    steps = max(args.gen - 1, 1)
    result = {
        "config": args.config if not args.checkpoint else args.checkpoint, "attention": args.attention,
        "dtype": dtype_name, "batch": args.batch, "prompt_len": args.prompt_len, "gen": args.gen,
        "mesh": args.mesh, "context_parallel": args.context_parallel, "kv_cache": args.kv_cache,
        "device": jax.devices()[0].device_kind, "jax": jax.__version__,
        "prefill_s": prefill_s, "prefill_tokens_per_s": float(np.sum(np.asarray(lengths))) / prefill_s,
        "decode_s": decode_s, "decode_steps": steps, "decode_tokens_per_s": args.batch * steps / decode_s,
        "ms_per_token": 1000 * decode_s / steps, "first_tokens": np.asarray(tokens)[:, :8].tolist(), **extra,
    }
    print(f"prefill: {result['prefill_tokens_per_s']:.1f} tokens/s ({prefill_s * 1000:.1f} ms)   "
          f"decode: {result['decode_tokens_per_s']:.1f} tokens/s, {result['ms_per_token']:.2f} ms/token "
          f"({args.attention}, {dtype_name}, {result['device']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
