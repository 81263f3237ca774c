"""ONNX export of a TRT-ViT model through jax2onnx, checked with ONNX Runtime
on the CPU: `python -m models.trt_vit.onnx_export --variant A --out a.onnx`.

jax2onnx converts the traced jaxpr primitive by primitive; a custom call
(the fused attention kernel) has no ONNX counterpart, so the exported graph
uses the model's plain einsum + softmax attention (`set_attention_backend(
model, "plain")`), which computes the same function. The model is exported
in inference mode (batch norm from running statistics).
"""
from __future__ import annotations

import argparse
import copy

import jax.numpy as jnp
import numpy as np
from flax import nnx

from .backbone import VARIANTS, Backbone, tiny_config
from .blocks import set_attention_backend


def export(model: nnx.Module, input_shape, path: str | None = None):
    """ONNX ModelProto of `model` (a copy with plain attention, eval mode)
    for float32 NHWC input of `input_shape`; also written to `path` if given."""
    import jax2onnx

    exported = set_attention_backend(copy.deepcopy(model), "plain")
    exported.eval()

    def forward(x):
        return exported(x)

    proto = jax2onnx.to_onnx(forward, [jax_input(input_shape)], model_name="trt_vit")
    # jax2onnx 0.17.1 keeps conv activations in NCHW between convs but can
    # leave NHWC shapes in the graph's value_info, which ONNX Runtime's
    # shape inference then rejects ("Incompatible dimensions" on a residual
    # Add). The intermediate annotations are optional: drop them and let
    # the runtime infer shapes from the ops.
    del proto.graph.value_info[:]
    if path is not None:
        import onnx
        onnx.save(proto, path)
    return proto


def jax_input(shape):
    import jax
    return jax.ShapeDtypeStruct(tuple(shape), jnp.float32)


def run_onnx(proto, x: np.ndarray) -> np.ndarray:
    """The exported model's output on `x` with ONNX Runtime's CPU provider."""
    import onnxruntime

    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return session.run(None, {name: np.asarray(x, np.float32)})[0]


def round_trip_error(model: nnx.Module, x: np.ndarray) -> float:
    """max |ONNX Runtime - JAX| / max |JAX| of the logits on `x`."""
    model.eval()
    expected = np.asarray(model(jnp.asarray(x)))
    got = run_onnx(export(model, x.shape), x)
    return float(np.max(np.abs(got - expected)) / max(np.max(np.abs(expected)), 1e-12))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=tuple(VARIANTS), default="A")
    parser.add_argument("--tiny", action="store_true", help="the 28x28x1 narrow copy (tiny_config)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--out", required=True, help="path of the .onnx file")
    args = parser.parse_args(argv)
    if args.tiny:
        model, shape = Backbone(tiny_config(args.variant), rngs=nnx.Rngs(0)), (1, 28, 28, 1)
    else:
        model, shape = Backbone(VARIANTS[args.variant], rngs=nnx.Rngs(0)), (1, args.image_size, args.image_size, 3)
    export(model, shape, args.out)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    print(f"wrote {args.out}; ONNX Runtime vs JAX, max relative error {round_trip_error(model, x):.2e}")


if __name__ == "__main__":
    main()
