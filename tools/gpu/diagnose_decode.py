"""Step-by-step check of the CUDA decode custom call through JAX (prints how
far it got; run under cuda-gdb for a native backtrace on a crash)."""
import faulthandler
import sys

faulthandler.enable()
import jax
import jax.numpy as jnp

from jax_fastattn import ffi, sharding

print("devices", jax.devices(), flush=True)
ffi.register()
print("cuda targets", sorted(ffi.cuda_targets()), flush=True)
q = jnp.ones((2, 8, 64), jnp.bfloat16)
k = jnp.ones((2, 100, 2, 64), jnp.bfloat16)
lengths = jnp.array([5, 100], jnp.int32)
raw = ffi.decode_ffi("cuda", 0.125, 2)
out = jax.jit(raw)(q, k, k, lengths, ffi.absent(jnp.int32))
jax.block_until_ready(out)
print("raw ffi call ok", float(out[0].astype(jnp.float32).sum()), flush=True)
call = sharding.decode_call("cuda", 0.125, False, 2)
out = jax.jit(call)(q, k, k, lengths, ffi.absent(jnp.int32))
jax.block_until_ready(out)
print("partitioned call ok", float(out[0].astype(jnp.float32).sum()), flush=True)
sys.exit(0)
