"""Perplexity of a causal language model on windows of tokenized text: the accuracy measure that
matters for an LLM (output SQNR says how far the logits moved, not whether the model still predicts).

    tokenizer = load_tokenizer("tok/")                    # a folder with tokenizer.json, or the file
    windows = text_windows(read_text("eval.txt"), tokenizer, window=128, count=8)   # int64 [8, 128]
    result = perplexity(model, windows)                   # result.perplexity, result.tokens

    perplexity = exp(mean over windows and positions t < T-1 of -log softmax(logits[t])[ids[t + 1]])

The model's first output must be logits [batch, seq, vocab]; its inputs may be `input_ids` and, filled
in here, `attention_mask` (ones) and `position_ids` (0..T-1). Windows are disjoint and spread evenly
over the text, so the same text and tokenizer always give the same windows. Models run through
`ModelRunner` (integer matmuls exact); the log-softmax is taken in float64.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from passes.core.errors import VerificationError
from passes.numerics.verify import ModelRunner

#: inputs a causal LM may take besides the token ids, and how they are filled for one window.
_FILLED: Mapping[str, Callable[[np.ndarray], np.ndarray]] = {
    "attention_mask": lambda ids: np.ones_like(ids),
    "position_ids": lambda ids: np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy(),
}
TOKEN_INPUT = "input_ids"
#: tokens per window where the model's sequence dim is symbolic.
DEFAULT_WINDOW = 128


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float  # nats per predicted token
    tokens: int  # predicted tokens (windows x (window - 1))
    windows: int


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """A `tokenizers.Tokenizer` from a folder holding tokenizer.json (as `save_pretrained` writes) or the file."""
    try:
        from tokenizers import Tokenizer
    except ImportError as err:
        raise VerificationError("reading text needs the tokenizers package (pip install 'passes[text]')") from err
    file = Path(path)
    if file.is_dir():
        file = file / "tokenizer.json"
    if not file.is_file():
        raise VerificationError(f"no tokenizer at {str(path)!r}: expected a tokenizer.json file or a folder holding one")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as err:  # the Rust side raises a bare Exception on malformed JSON
        raise VerificationError(f"cannot read tokenizer {str(file)!r}: {str(err).splitlines()[0]}") from err


def read_text(path: str | os.PathLike[str]) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise VerificationError(f"cannot read text {str(path)!r}: {err}") from err


def text_windows(text: str, tokenizer: Any, *, window: int, count: int) -> np.ndarray:
    """`count` disjoint windows of `window` token ids, spread evenly over `text` (int64 [count, window])."""
    if window < 2 or count < 1:
        raise VerificationError(f"need at least one window of >= 2 tokens, got {count} x {window}")
    ids = np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)
    if ids.size < window * count:
        raise VerificationError(f"the text has {ids.size} tokens; {count} windows of {window} need {window * count}")
    stride = ids.size // count
    return np.stack([ids[i * stride:i * stride + window] for i in range(count)])


def lm_feeds(model: onnx.ModelProto, ids: np.ndarray) -> dict[str, np.ndarray]:
    """The inputs of `model` for one batch of token ids."""
    initializers = {t.name for t in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        if value.name == TOKEN_INPUT:
            feeds[value.name] = ids
        elif value.name in _FILLED:
            feeds[value.name] = _FILLED[value.name](ids)
        else:
            raise VerificationError(f"cannot evaluate perplexity: input '{value.name}' is not one of "
                                    f"{TOKEN_INPUT}, {', '.join(_FILLED)}")
    if TOKEN_INPUT not in feeds:
        raise VerificationError(f"cannot evaluate perplexity: the model has no '{TOKEN_INPUT}' input")
    return feeds


def token_nll(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """-log p(ids[:, t + 1] | logits[:, t]) for every t < T - 1, in float64 ([batch, T - 1])."""
    if logits.ndim != 3 or logits.shape[:2] != ids.shape:
        raise VerificationError(f"expected logits [batch, seq, vocab] for ids {list(ids.shape)}, "
                                f"got {list(logits.shape)}")
    scores = logits[:, :-1].astype(np.float64)
    peak = scores.max(axis=-1, keepdims=True)
    log_norm = peak[..., 0] + np.log(np.exp(scores - peak).sum(axis=-1))
    target = np.take_along_axis(scores, ids[:, 1:, None], axis=-1)[..., 0]
    return log_norm - target


def perplexity(model: onnx.ModelProto, windows: np.ndarray, *, runner: ModelRunner | None = None) -> PerplexityResult:
    """Perplexity of `model` over `windows` (int64 [count, window]), one window per run at batch 1."""
    runner = runner or ModelRunner(model)
    losses = []
    for row in np.asarray(windows, dtype=np.int64):
        ids = row[None, :]
        logits = runner(lm_feeds(model, ids))[runner.names[0]]
        losses.append(token_nll(np.asarray(logits), ids))
    nll = np.concatenate([loss.reshape(-1) for loss in losses])
    if not np.all(np.isfinite(nll)):
        return PerplexityResult(math.inf, math.inf, int(nll.size), len(losses))
    mean = float(nll.mean())
    return PerplexityResult(math.exp(mean), mean, int(nll.size), len(losses))


def token_shape(model: onnx.ModelProto) -> tuple[int, int]:
    """(batch, window) of the model's `input_ids`: its static dims, else 1 and `DEFAULT_WINDOW`."""
    value = next((v for v in model.graph.input if v.name == TOKEN_INPUT), None)
    dims = list(value.type.tensor_type.shape.dim) if value is not None else []
    if len(dims) != 2:
        raise VerificationError(f"text needs a 2-D '{TOKEN_INPUT}' input [batch, seq]; the model's inputs are "
                                f"{[v.name for v in model.graph.input]}")
    batch, window = (d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else default
                     for d, default in zip(dims, (1, DEFAULT_WINDOW)))
    return batch, window


def text_feeds(model: onnx.ModelProto, text: str | os.PathLike[str], tokenizer: str | os.PathLike[str],
               count: int) -> list[dict[str, np.ndarray]]:
    """`count` input sets for a language model: windows of `text` at its `input_ids` shape."""
    batch, window = token_shape(model)
    windows = text_windows(read_text(text), load_tokenizer(tokenizer), window=window, count=count * batch)
    return [lm_feeds(model, windows[i * batch:(i + 1) * batch]) for i in range(count)]


def eval_windows(model: onnx.ModelProto, text: str | os.PathLike[str], tokenizer: str | os.PathLike[str],
                 count: int) -> list[np.ndarray]:
    """`count` x batch windows of `text` at the model's `input_ids` shape (128 tokens where it is symbolic),
    one row each."""
    return [row for feed in text_feeds(model, text, tokenizer, count) for row in feed[TOKEN_INPUT]]


def perplexity_change(original: onnx.ModelProto, quantized: onnx.ModelProto, rows: list[np.ndarray]) -> dict[str, Any]:
    """Float and quantized perplexity on the same windows, and the relative increase in percent."""
    before, after = perplexity(original, np.stack(rows)), perplexity(quantized, np.stack(rows))
    return {"float": before.perplexity, "quantized": after.perplexity, "windows": len(rows),
            "window": int(len(rows[0])), "tokens": after.tokens,
            "increase_pct": 100.0 * (after.perplexity / before.perplexity - 1.0)}
