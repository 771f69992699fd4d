"""Calibration: the value ranges of chosen intermediate tensors on representative inputs.

    ranges = activation_ranges(model, ["x", "h"], feeds, percentile=99.99)   # {name: TensorRange}

The model runs under onnxruntime (`passes.numerics.verify.ModelRunner`, so onnx.reference where ORT lacks an
op) as a *copy* with the tensors exposed as extra graph outputs; the caller's model is never modified.
Estimators reduce every value seen for a tensor (over all feeds) to a [low, high] range:

    min-max:     [min x, max x]
    percentile:  [P_(100-p)(x), P_p(x)]                   (p = 100 is min-max)
    entropy:     |x| clipped at the threshold T minimising KL(P || Q), P the 2048-bin histogram of |x|
                 folded at T, Q its 128-level quantization (TensorRT's calibrator); [max(min x, -T), min(max x, T)]

Calibration inputs come from an .npz holding one array per graph input, or from text cut into token
windows by a tokenizer (`load_calibration`), or are generated at the model's shapes with `passes.numerics.verify.random_feeds` (`generated_feeds`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx

from passes.core.errors import VerificationError
from passes.numerics.verify import ModelRunner, input_dims, random_feeds

Feeds = Mapping[str, np.ndarray]
Estimator = Literal["minmax", "percentile", "entropy"]

#: random feeds generated when no calibration data is given, and the size given to dynamic dims.
GENERATED_SAMPLES = 4
GENERATED_DYNAMIC_DIM = 8
#: percentile and entropy estimators look at most this many values per tensor (evenly strided).
MAX_SAMPLED_VALUES = 1 << 21
HISTOGRAM_BINS = 2048
#: windows of text a text calibration set holds (each at the model's batch x sequence).
TEXT_SAMPLES = 8
QUANTIZED_LEVELS = 128


@dataclass(frozen=True)
class TensorRange:
    low: float
    high: float


def collect_tensors(model: onnx.ModelProto, names: Sequence[str], feeds: Sequence[Feeds], *,
                    weights: Mapping[str, np.ndarray] | None = None) -> dict[str, list[np.ndarray]]:
    """The values of `names` (intermediate tensors, graph outputs or inputs) on each of `feeds`;
    `weights`: arrays the caller holds for the model's initializers (see `ModelRunner`)."""
    collected: dict[str, list[np.ndarray]] = {name: [] for name in names}
    runner = ModelRunner(model, outputs=names, weights=weights)
    for feed in feeds:
        values = {**dict(feed), **runner(feed)}
        for name in names:
            collected[name].append(np.asarray(values[name]))
    return collected


def activation_ranges(
    model: onnx.ModelProto, names: Sequence[str], feeds: Sequence[Feeds], *, percentile: float = 100.0,
    estimator: Estimator | None = None,
) -> dict[str, TensorRange]:
    """The range of each tensor in `names` over `feeds`: min-max at percentile 100, else the
    percentile estimator (or `estimator` when given)."""
    if not feeds:
        raise VerificationError("calibration needs at least one set of inputs")
    method = estimator or ("minmax" if percentile >= 100.0 else "percentile")
    collected = collect_tensors(model, names, feeds)
    ranges = {}
    for name, arrays in collected.items():
        values = np.concatenate([a.reshape(-1).astype(np.float64) for a in arrays])
        ranges[name] = estimate_range(values, method, percentile)
    return ranges


def estimate_range(values: np.ndarray, estimator: Estimator, percentile: float = 100.0) -> TensorRange:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return TensorRange(0.0, 0.0)
    low, high = float(finite.min()), float(finite.max())
    if estimator == "minmax":
        return TensorRange(low, high)
    sampled = finite[:: max(1, finite.size // MAX_SAMPLED_VALUES)]
    if estimator == "percentile":
        return TensorRange(float(np.percentile(sampled, 100.0 - percentile)), float(np.percentile(sampled, percentile)))
    threshold = entropy_threshold(np.abs(sampled))
    return TensorRange(max(low, -threshold), min(high, threshold))


def entropy_threshold(magnitudes: np.ndarray, bins: int = HISTOGRAM_BINS, levels: int = QUANTIZED_LEVELS) -> float:
    """The clipping threshold of |x| with the least KL divergence between the clipped histogram and
    its `levels`-level quantization."""
    peak = float(magnitudes.max(initial=0.0))
    if peak == 0.0:
        return 0.0
    histogram, edges = np.histogram(magnitudes, bins=bins, range=(0.0, peak))
    histogram = histogram.astype(np.float64)
    best, best_divergence = bins, np.inf
    for cut in range(levels, bins + 1, max(1, (bins - levels) // 128)):
        reference = histogram[:cut].copy()
        reference[-1] += histogram[cut:].sum()
        divergence = _kl_divergence(reference, _quantized(histogram[:cut], levels))
        if divergence < best_divergence:
            best, best_divergence = cut, divergence
    return float(edges[best])


def _quantized(histogram: np.ndarray, levels: int) -> np.ndarray:
    """`histogram` merged into `levels` groups and spread back evenly over each group's non-empty bins."""
    groups = np.array_split(np.arange(histogram.size), levels)
    expanded = np.zeros_like(histogram)
    for group in groups:
        nonzero = histogram[group] > 0
        if nonzero.any():
            expanded[group[nonzero]] = histogram[group].sum() / nonzero.sum()
    return expanded


def _kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    p, q = p / max(p.sum(), 1e-30), q / max(q.sum(), 1e-30)
    mask = p > 0
    if np.any(q[mask] == 0):
        return np.inf
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def check_calibration_file(path: str | os.PathLike[str], *, tokenizer: object = None) -> None:
    """Raise ValueError unless `path` can be calibration data: a regular file; an .npz (a zip archive)
    unless a tokenizer will cut it as text. Checked when the option is given, before any work."""
    path = Path(path)
    try:
        if not path.is_file():
            raise ValueError(f"calibration {str(path)!r}: no such file" if not path.exists()
                             else f"calibration {str(path)!r}: not a regular file")
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError as err:
        raise ValueError(f"calibration {str(path)!r}: cannot read ({err.strerror or err})") from err
    if not tokenizer and (path.suffix.lower() != ".npz" or head[:2] != b"PK"):
        raise ValueError(f"calibration {str(path)!r} is not an .npz of the model's inputs "
                         "(text needs a tokenizer)")


def load_calibration(path: str | Path, model: onnx.ModelProto, *, tokenizer: str | Path | None = None,
                     samples: int = TEXT_SAMPLES) -> list[dict[str, np.ndarray]]:
    """Calibration inputs from a file: an .npz holding an array per graph input (by name), each either at
    the input's shape (one sample) or with one more leading axis (that many samples); or, with a
    `tokenizer`, a text file cut into `samples` windows of the model's sequence length (a language
    model's `input_ids`, see `passes.numerics.perplexity`)."""
    if tokenizer and Path(path).suffix.lower() != ".npz":
        return _text_calibration(path, model, tokenizer, samples)
    try:
        with np.load(path, allow_pickle=False) as data:
            feeds = {key: np.asarray(data[key]) for key in data.files}
    except (OSError, ValueError, EOFError) as err:
        raise VerificationError(f"cannot read calibration data {str(path)!r} (an .npz of the model's inputs, "
                                f"or text with --tokenizer): {err}") from err
    dims = input_dims(model)
    if set(feeds) != set(dims):
        raise VerificationError(f"calibration data {str(path)!r} holds {sorted(feeds)}; the model's inputs "
                                f"are {sorted(dims)}")
    counts = set()
    for name, value in feeds.items():
        rank = len(dims[name])
        if value.ndim not in (rank, rank + 1):
            raise VerificationError(f"calibration array '{name}' is {value.ndim}-D; the input is {rank}-D "
                                    f"(or {rank + 1}-D with a leading sample axis)")
        counts.add(1 if value.ndim == rank else value.shape[0])
    if len(counts) != 1:
        raise VerificationError(f"calibration arrays in {str(path)!r} hold different numbers of samples: {sorted(counts)}")
    count = counts.pop()
    stacked = {name: value if value.ndim == len(dims[name]) + 1 else value[None] for name, value in feeds.items()}
    return [{name: value[i] for name, value in stacked.items()} for i in range(count)]


def _text_calibration(path: str | Path, model: onnx.ModelProto, tokenizer: str | Path,
                      samples: int) -> list[dict[str, np.ndarray]]:
    from passes.numerics.perplexity import text_feeds

    return text_feeds(model, path, tokenizer, samples)


def generated_feeds(model: onnx.ModelProto, count: int = GENERATED_SAMPLES,
                    dynamic_dim: int = GENERATED_DYNAMIC_DIM) -> list[dict[str, np.ndarray]]:
    """`count` seeded random input sets at the model's static dims, dynamic dims set to `dynamic_dim`."""
    shapes = input_dims(model, dynamic_dim=dynamic_dim)
    return [random_feeds(model, seed, input_shapes=shapes) for seed in range(count)]
