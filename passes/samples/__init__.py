"""`passes.samples`: bundled sample models, built in memory with `onnx.helper` (no downloads, no torch).
May import `passes.core` only.

Each sample is a small transformer written op for op the way a PyTorch exporter emits it, in
either the TorchScript idiom (`torch.onnx.export(dynamo=False)`: opset 17 / 14, `Constant`
nodes, verbose `Shape -> Gather -> Unsqueeze -> Concat` reshape chains) or the dynamo idiom
(opset 18, initializer constants, `Shape(start, end)` chains, `ReduceMean` axes as an input).
Sizes are parameters, so the same generator makes toy graphs for unit tests and graphs of
thousands of nodes for speed tests. Weights are random, small and deterministic in `seed`.

    model = build_sample("tiny-llama", idiom="dynamo", layers=4)
    cached = build_sample("tiny-llama", kv_cache=True, kv_heads=2)  # past/present keys and values, GQA

`kv_cache=True` (tiny-llama only) gives the decoder-with-past interface Hugging Face exports have:
inputs `input_ids`, `attention_mask` [batch, total], `position_ids`, `past_key_values.{i}.key|value`
[batch, kv_heads, past, head_dim]; outputs `logits`, `present.{i}.key|value` [batch, kv_heads, total,
head_dim] (see `passes.samples._kv_cache`).
"""

from __future__ import annotations

from typing import Literal, get_args

import onnx

from passes.core.errors import SampleError
from passes.samples._blocks import SampleConfig
from passes.samples._builder import export_style
from passes.samples._decoder import build_decoder
from passes.samples._encoder import build_encoder

__all__ = ["SAMPLE_NAMES", "Idiom", "build_sample", "describe_samples"]

Idiom = Literal["torchscript", "dynamo"]
SAMPLE_NAMES: tuple[str, ...] = ("tiny-llama", "tiny-bert")

_IDIOMS: tuple[str, ...] = get_args(Idiom)
_OPSETS: dict[tuple[str, str], int] = {
    ("tiny-llama", "torchscript"): 17,
    ("tiny-llama", "dynamo"): 18,
    ("tiny-bert", "torchscript"): 14,
    ("tiny-bert", "dynamo"): 18,
}
_DESCRIPTIONS: dict[str, str] = {
    "tiny-llama": "Llama-style decoder: RMSNorm, Q/K/V with biases, rotary embeddings, causal "
    "attention, SwiGLU MLP; input_ids -> logits (kv_cache: + attention_mask, position_ids, past -> present)",
    "tiny-bert": "BERT-style encoder: word+position embeddings, LayerNorm, masked attention, "
    "GELU (Erf) MLP; input_ids, attention_mask -> last_hidden_state",
}


def describe_samples() -> dict[str, str]:
    """Sample name -> one-line description."""
    return {name: _DESCRIPTIONS[name] for name in SAMPLE_NAMES}


def build_sample(name: str, *, idiom: Idiom = "torchscript", layers: int = 2, hidden: int = 64,
                 heads: int = 4, vocab: int = 256, intermediate: int | None = None,
                 seed: int = 0, kv_cache: bool = False, kv_heads: int | None = None) -> onnx.ModelProto:
    """Build sample `name` in the exporter `idiom`; raises `SampleError` on bad names or sizes.

    tiny-llama only: `kv_cache` adds the past/present key-value interface; `kv_heads` (default
    `heads`, a divisor of it) sets the key/value heads (grouped-query attention when fewer)."""
    if name not in SAMPLE_NAMES:
        raise SampleError(f"unknown sample {name!r}; valid names: {', '.join(SAMPLE_NAMES)}")
    if idiom not in _IDIOMS:
        raise SampleError(f"unknown idiom {idiom!r}; valid idioms: {', '.join(_IDIOMS)}")
    if not isinstance(kv_cache, bool):
        raise SampleError(f"kv_cache must be True or False, got {kv_cache!r}")
    if kv_cache and name != "tiny-llama":
        raise SampleError(f"kv_cache is a tiny-llama option; {name} has no key/value cache")
    cfg = _config(name, layers, hidden, heads, vocab, intermediate, seed, kv_heads)
    style = export_style(idiom, _OPSETS[(name, idiom)])
    if name == "tiny-llama":
        return build_decoder(cfg, style, with_kv_cache=kv_cache)
    return build_encoder(cfg, style)


def _int_at_least(label: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SampleError(f"{label} must be an integer >= {minimum}, got {value!r}")
    return value


def _config(name: str, layers: int, hidden: int, heads: int, vocab: int,
            intermediate: int | None, seed: int, kv_heads: int | None = None) -> SampleConfig:
    """Validate the size parameters and fill in the default MLP width."""
    layers = _int_at_least("layers", layers)
    heads = _int_at_least("heads", heads)
    hidden = _int_at_least("hidden", hidden)
    vocab = _int_at_least("vocab", vocab)
    seed = _int_at_least("seed", seed, minimum=0)
    if hidden % heads:
        valid = ", ".join(str(h) for h in range(1, hidden + 1) if hidden % h == 0)
        raise SampleError(f"hidden ({hidden}) must be divisible by heads ({heads}); "
                          f"valid heads for hidden={hidden}: {valid}")
    if name == "tiny-llama" and (hidden // heads) % 2:
        raise SampleError(f"tiny-llama needs an even head dim for rotary embeddings, got "
                          f"hidden/heads = {hidden}/{heads} = {hidden // heads}; pick hidden = 2*k*heads")
    if intermediate is None:
        intermediate = _default_intermediate(name, hidden)
    intermediate = _int_at_least("intermediate", intermediate)
    return SampleConfig(layers, hidden, heads, vocab, intermediate, seed, _kv_heads(name, heads, kv_heads))


def _kv_heads(name: str, heads: int, kv_heads: int | None) -> int:
    """`kv_heads`, default `heads`: a divisor of `heads` (each K/V head serves heads // kv_heads queries)."""
    if kv_heads is None:
        return heads
    kv_heads = _int_at_least("kv_heads", kv_heads)
    if name != "tiny-llama" and kv_heads != heads:
        raise SampleError(f"kv_heads is a tiny-llama option; {name} has as many key/value heads as heads ({heads})")
    if heads % kv_heads:
        valid = ", ".join(str(k) for k in range(1, heads + 1) if heads % k == 0)
        raise SampleError(f"heads ({heads}) must be divisible by kv_heads ({kv_heads}); "
                          f"valid kv_heads for heads={heads}: {valid}")
    return kv_heads


def _default_intermediate(name: str, hidden: int) -> int:
    """BERT: 4 * hidden; Llama: 8/3 * hidden rounded up to a multiple of 16."""
    if name == "tiny-bert":
        return 4 * hidden
    return -(-(8 * hidden // 3) // 16) * 16
