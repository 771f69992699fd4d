"""Mixed precision by sensitivity, for `quantize-int8`: each W8A8 candidate's own quantization error.

    sqnr = local_sqnr(activations, weight, granularity="per-token")      # dB, over the calibration set

The layer's float inputs (from the float model on the calibration set) are quantized the way the scheme
will at run time, with numpy: weights per output channel (int8, symmetric), activations per tensor
(uint8 asymmetric: the static range, or each sample's own min/max for dynamic) or per token (int8
symmetric per row). The SQNR of that product against the float product x @ W measures the layer alone,
not the error earlier layers hand it, so the ranking points at the layers that hurt. It is taken per
token and averaged (`token_sqnr_db`): a trained LLM's first token carries activations 100-1000x the
others' in some layers, and a plain SQNR would be that token's alone. Layers below the
threshold keep float activations (W8A16).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from passes.transforms._quantize import (
    INT8_LIMIT,
    TINY_SCALE,
    ActivationQuantization,
    activation_quantization,
    quantize_weight,
)

#: rows of activations (tokens) a layer's SQNR is measured on: evenly strided over the calibration set.
MAX_ROWS = 512


@dataclass(frozen=True)
class LayerSensitivity:
    layer: str  # the matmul's output tensor
    sqnr_db: float
    kept: str  # "w8a8" or the fallback ("w8a16", or "float" where the opset has no per-axis DequantizeLinear)

    def to_dict(self) -> dict[str, object]:
        value: object = self.sqnr_db if math.isfinite(self.sqnr_db) else "inf"
        return {"layer": self.layer, "sqnr_db": value, "kept": self.kept}


def per_token(x: np.ndarray) -> np.ndarray:
    """x after int8 per-row symmetric quantization and back (float64)."""
    scale = np.maximum(np.abs(x).max(axis=-1, keepdims=True).astype(np.float32) / np.float32(INT8_LIMIT), TINY_SCALE)
    return np.clip(np.rint(x / scale), -INT8_LIMIT, INT8_LIMIT) * scale.astype(np.float64)


def per_tensor(x: np.ndarray, params: ActivationQuantization) -> np.ndarray:
    """x after uint8 asymmetric quantization with `params` and back (float64)."""
    q = np.clip(np.rint(x / params.scale) + params.zero_point, 0, 255)
    return (q - params.zero_point) * params.scale


def local_sqnr(samples: Sequence[np.ndarray], weight: np.ndarray, *, granularity: str,
               static: ActivationQuantization | None = None) -> float:
    """SQNR (dB) of the quantized product against x @ W over `samples` (activations [..., K] per
    calibration sample; `weight` [K, N]). `static` is the calibrated range of a static scheme;
    without it per-tensor parameters come from each sample (dynamic)."""
    stride = max(1, sum(int(np.prod(s.shape[:-1])) for s in samples) // MAX_ROWS)
    w = weight.astype(np.float64)
    quantized = quantize_weight(weight, 1)
    w_q = quantized.values.astype(np.float64) * quantized.scale.astype(np.float64)
    reference, candidate = [], []
    for sample in samples:
        rows = sample.reshape(-1, sample.shape[-1]).astype(np.float32)
        if granularity == "per-token":
            x_q = per_token(rows[::stride])
        else:
            params = static or activation_quantization(float(rows.min(initial=0.0)), float(rows.max(initial=0.0)))
            x_q = per_tensor(rows[::stride].astype(np.float64), params)
        x = rows[::stride].astype(np.float64)
        reference.append(x @ w)
        candidate.append(x_q @ w_q)
    return token_sqnr_db(np.concatenate(reference), np.concatenate(candidate))


def token_sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    """-10 log10 of the mean over rows (tokens) of |ref - q|^2 / |ref|^2: every token counts the same, so
    a few tokens with massive activations (an attention sink's) cannot hide the error of all the others.
    Rows whose reference is 0 count only if the candidate is not."""
    signal = np.sum(np.square(reference), axis=-1)
    noise = np.sum(np.square(reference - candidate), axis=-1)
    ratios = np.where(signal > 0, noise / np.where(signal > 0, signal, 1.0), np.where(noise > 0, np.inf, 0.0))
    mean = float(np.mean(ratios)) if ratios.size else 0.0
    if mean == 0.0:
        return math.inf
    return -10.0 * math.log10(mean) if math.isfinite(mean) else -math.inf
