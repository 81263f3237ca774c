"""The CSMPQ layer score: class separability of a layer's features measured
with TF-IDF, without labels (arXiv 2212.10220, Sec. 3.2).

For one layer and N calibration images, F [C, N] holds the layer's output
after ReLU and global average pooling (channel c, image n). A channel is
"present" in an image (the word occurs in the document) when its activation
reaches the channel's mean over the N images:

    b[c, n]  = F[c, n] >= mean_n F[c, :]
    tf[c, n] = F[c, n] / sum_c F[:, n]                      (term frequency)
    idf[c]   = ln(N / (sum_n b[c, n] + 1))                  (inverse document frequency)
    S[c]     = sum_n tf[c, n] b[c, n] / (sum_n b[c, n] + 1e-11)
    score    = mean_c S[c] * idf[c]

Channels that fire strongly in few images (discriminative features) score
high. An image whose pooled features are all zero contributes tf = 0.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def pooled_features(activation):
    """[N, H, W, C] activation -> F [C, N]: ReLU, then global average pooling."""
    if activation.ndim != 4:
        raise ValueError(f"activation must be [N, H, W, C], got shape {activation.shape}")
    return jnp.mean(jax.nn.relu(activation), axis=(1, 2)).T


@jax.jit
def layer_score(features):
    """TF-IDF separability score of one layer from F [C, N] (float)."""
    features = jnp.asarray(features, jnp.float32)
    n = features.shape[1]
    present = features >= jnp.mean(features, axis=1, keepdims=True)
    column_total = jnp.sum(features, axis=0, keepdims=True)
    tf = jnp.where(column_total > 0, features / jnp.where(column_total > 0, column_total, 1.0), 0.0)
    document_count = jnp.sum(present, axis=1)
    idf = jnp.log(n / (document_count + 1.0))
    strength = jnp.sum(tf * present, axis=1) / (document_count + 1e-11)
    return jnp.mean(strength * idf)


def _all_scores(model, images):
    _, outputs = model(images, collect=True)
    return jnp.stack([layer_score(pooled_features(o)) for o in outputs])


_all_scores_jit = None


def model_scores(model, images):
    """γ of every quantizable layer of `model` (a models/ CNN whose
    `__call__(x, collect=True)` returns the layers' outputs), from one batch
    of calibration images, batch norm in inference mode. Compiled once per
    model structure and input shape (later calls reuse it)."""
    global _all_scores_jit
    from flax import nnx

    if _all_scores_jit is None:
        _all_scores_jit = nnx.jit(_all_scores)
    model.eval()
    return _all_scores_jit(model, jnp.asarray(images))
