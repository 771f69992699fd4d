"""Tiny random-weight transformers from `transformers`, exported by both PyTorch ONNX exporters.

    path = export_model("llama", "dynamo", cache_dir)   # one self-contained .onnx, cached

Models are built from config classes with `torch.manual_seed(0)` (no downloads, no tokenizer, no
`from_pretrained`), wrapped so the graph has `input_ids` (+ `attention_mask` for encoders) in and one
tensor out, and exported with dynamic `batch` and `seq` axes: TorchScript at opset 17, dynamo at
opset 18. Every fresh export is checked against PyTorch at two shapes before it enters the cache, so
a test failure downstream is ours, not the exporter's. torch and transformers are imported only on a
cache miss: a warm run never loads them.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, get_args

import numpy as np
import onnx

from tests._checkout_imports import install as _install_checkout_imports

_install_checkout_imports()  # bench/ imports this module with the checkout's root on sys.path

Exporter = Literal["torchscript", "dynamo"]
EXPORTERS: tuple[Exporter, ...] = get_args(Exporter)
OPSETS: Mapping[str, int] = MappingProxyType({"torchscript": 17, "dynamo": 18})
#: trace at this (batch, seq); neither may be 0 or 1, or torch.export specialises the dim.
EXAMPLE_SHAPE = (2, 8)
#: shapes at which a fresh export must reproduce PyTorch before it is cached.
CHECK_SHAPES = ((1, 7), (2, 12))
#: float32, the same weights run by PyTorch and onnxruntime: kernel-level rounding only.
CHECK_RTOL, CHECK_ATOL = 1e-4, 1e-5
#: default attention in transformers 5: what a user who calls torch.onnx.export gets.
ATTENTION = "sdpa"


class ExportError(RuntimeError):
    """An exporter failed, or its model does not reproduce PyTorch."""


@dataclass(frozen=True)
class ArchSpec:
    """One architecture: transformers class names, config fields and the graph's interface."""

    config_class: str
    model_class: str
    config: Mapping[str, Any]
    inputs: tuple[str, ...]
    output: str
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    forward_kwargs: Mapping[str, Any] = field(default_factory=dict)


_DECODER_SIZES = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # GQA: two query heads share each K/V head
    "vocab_size": 256,
    "max_position_embeddings": 128,
    "use_cache": False,
}

ARCHS: Mapping[str, ArchSpec] = MappingProxyType(
    {
        # RMSNorm, GQA, SwiGLU, rotary; Q/K/V as three bias-free MatMuls
        "llama": ArchSpec("LlamaConfig", "LlamaForCausalLM", _DECODER_SIZES, ("input_ids",), "logits",
                          forward_kwargs={"use_cache": False}),
        # llama's block with biased Q/K/V projections (MatMul + Add)
        "qwen2": ArchSpec("Qwen2Config", "Qwen2ForCausalLM", _DECODER_SIZES, ("input_ids",), "logits",
                          forward_kwargs={"use_cache": False}),
        # LayerNorm, learned positions, one fused c_attn projection split three ways, tanh GELU
        "gpt2": ArchSpec("GPT2Config", "GPT2LMHeadModel",
                         {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 256, "n_positions": 128,
                          "bos_token_id": 255, "eos_token_id": 255, "use_cache": False},
                         ("input_ids",), "logits", forward_kwargs={"use_cache": False}),
        # encoder: LayerNorm, erf GELU, padding mask from an input
        "bert": ArchSpec("BertConfig", "BertModel",
                         {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "vocab_size": 256, "max_position_embeddings": 128},
                         ("input_ids", "attention_mask"), "last_hidden_state",
                         model_kwargs={"add_pooling_layer": False}),
    }
)


def export_model(arch: str, exporter: Exporter, cache_dir: Path) -> Path:
    """The cached export of `arch` by `exporter` in `cache_dir`, exporting it first on a miss."""
    return cached_file(cached_path(arch, exporter, cache_dir), f"{arch}-{exporter}-*.onnx",
                       lambda: _export_checked(arch, exporter, cache_dir))


def cached_file(path: Path, stale: str, make: Callable[[], onnx.ModelProto]) -> Path:
    """`path`, written from `make()` on a miss: one pytest-xdist worker exports while the others wait, the
    file appears whole (staged beside it, then renamed), and older exports in the folder matching the
    `stale` glob (other versions or recipes) go."""
    if path.is_file():
        return path
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    with _file_lock(folder / f".{stale.replace('*', '')}.lock"):
        if path.is_file():
            return path
        model = make()
        handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
        with os.fdopen(handle, "wb") as stream:
            stream.write(model.SerializeToString())
        os.chmod(staging, 0o644)  # mkstemp's 0600 would hide the cache from other users of the checkout
        os.replace(staging, path)
        for old in folder.glob(stale):
            if old != path:
                old.unlink(missing_ok=True)
    return path


def cached_folder(folder: Path, stale: str, make: Callable[[Path], None], ready: Sequence[str]) -> Path:
    """`folder`, filled by `make(staging)` on a miss (it is there once every file in `ready` is), with
    `cached_file`'s guarantees: one worker makes it, it appears whole, older folders matching `stale` go."""
    def done() -> bool:
        return all((folder / name).is_file() for name in ready)

    if done():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(folder.parent / f".{stale.replace('*', '')}.lock"):
        if done():
            return folder
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            make(staging)
            os.chmod(staging, 0o755)  # mkdtemp's 0700 would hide the cache from other users of the checkout
            for old in folder.parent.glob(stale):
                shutil.rmtree(old, ignore_errors=True)
            os.replace(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def cached_path(arch: str, exporter: Exporter, cache_dir: Path) -> Path:
    """Where the export lives: arch, exporter, library versions and a hash of config and recipe."""
    spec = _spec(arch)
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; valid exporters: {', '.join(EXPORTERS)}")
    versions = {name: _version(name) for name in ("torch", "transformers", "onnxscript")}
    recipe = {"spec": asdict(spec), "opset": OPSETS[exporter], "attention": ATTENTION, "versions": versions,
              "source": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:12]
    label = f"torch{versions['torch']}-transformers{versions['transformers']}".replace("+", "_")
    return Path(cache_dir) / f"{arch}-{exporter}-{label}-{digest}.onnx"


#: larger exports for the benchmarks (`bench/e2e.py`), not run by the tests: a Llama at the sample
#: decoder's realistic width (hidden 1024, 4 layers, GQA 16 / 4 heads)
BENCH_ARCHS: Mapping[str, ArchSpec] = MappingProxyType(
    {
        "llama-1024": ArchSpec("LlamaConfig", "LlamaForCausalLM",
                               {**_DECODER_SIZES, "hidden_size": 1024, "intermediate_size": 2736,
                                "num_hidden_layers": 4, "num_attention_heads": 16, "num_key_value_heads": 4,
                                "max_position_embeddings": 256},
                               ("input_ids",), "logits", forward_kwargs={"use_cache": False}),
    }
)


#: deep exports: 32 layers at the tiny width, where the pipeline's symbolic dims must stay distinct across
#: dozens of shape-inference runs (two layers never show a collision; issue 14 found one at layer 13)
DEEP_ARCHS: Mapping[str, ArchSpec] = MappingProxyType(
    {
        "llama-deep": ArchSpec("LlamaConfig", "LlamaForCausalLM", {**_DECODER_SIZES, "num_hidden_layers": 32},
                               ("input_ids",), "logits", forward_kwargs={"use_cache": False}),
    }
)


def _spec(arch: str) -> ArchSpec:
    known = {**ARCHS, **BENCH_ARCHS, **DEEP_ARCHS}
    try:
        return known[arch]
    except KeyError:
        raise ValueError(f"unknown arch {arch!r}; valid archs: {', '.join(known)}") from None


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # no flock (Windows): concurrent workers may both export; os.replace keeps it safe
        yield
        return
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _export_checked(arch: str, exporter: Exporter, cache_dir: Path) -> onnx.ModelProto:
    """Export once, inline the weights, and check the result against PyTorch at `CHECK_SHAPES`."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach the network
    spec = _spec(arch)
    module = _build_module(spec)
    with tempfile.TemporaryDirectory(dir=cache_dir) as scratch:
        raw = Path(scratch) / f"{arch}.onnx"
        try:
            _run_exporter(module, spec, exporter, raw)
        except Exception as err:
            raise ExportError(f"{exporter} export of {arch} failed: {str(err).splitlines()[0]}") from err
        model = onnx.load_model(str(raw), load_external_data=True)  # weights inline: one file
    onnx.checker.check_model(model)
    for shape in CHECK_SHAPES:
        _check_against_torch(module, spec, model, shape, f"{exporter} export of {arch}")
    return model


def _build_module(spec: ArchSpec) -> Any:
    import torch
    import transformers

    class SingleOutput(torch.nn.Module):
        """Calls the model with a dict result and returns one tensor: the exported graph's only output."""

        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
            if attention_mask is None:
                # an explicit all-ones mask, as a generation loop without padding passes: without one,
                # transformers probes position_ids for packed sequences with aten::diff, which the
                # TorchScript exporter cannot export
                attention_mask = torch.ones_like(input_ids)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True,
                             **spec.forward_kwargs)
            return out[spec.output]

    config = getattr(transformers, spec.config_class)(**spec.config, attn_implementation=ATTENTION)
    torch.manual_seed(0)
    model = getattr(transformers, spec.model_class)(config, **spec.model_kwargs)
    return SingleOutput(model).eval()


def _example_inputs(spec: ArchSpec, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """Seeded token ids; an encoder's mask pads the tail of every row but the first."""
    rng = np.random.default_rng(list(shape))
    vocab = int(spec.config.get("vocab_size", 2))
    feeds = {"input_ids": rng.integers(0, vocab, size=shape, dtype=np.int64)}
    if "attention_mask" in spec.inputs:
        mask = np.ones(shape, dtype=np.int64)
        mask[1:, shape[1] // 2 + 1:] = 0
        feeds["attention_mask"] = mask
    return feeds


def _run_exporter(module: Any, spec: ArchSpec, exporter: Exporter, path: Path) -> None:
    import torch

    args = tuple(torch.from_numpy(v) for v in _example_inputs(spec, EXAMPLE_SHAPE).values())
    names = list(spec.inputs)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # exporter deprecation and tracer warnings are not ours
        if exporter == "torchscript":
            axes = {name: {0: "batch", 1: "seq"} for name in [*names, spec.output]}
            torch.onnx.export(module, args, str(path), input_names=names, output_names=[spec.output],
                              opset_version=OPSETS[exporter], dynamo=False, dynamic_axes=axes)
        else:
            batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=1, max=128)
            shapes = {name: {0: batch, 1: seq} for name in names}
            torch.onnx.export(module, args, str(path), input_names=names, output_names=[spec.output],
                              opset_version=OPSETS[exporter], dynamo=True, dynamic_shapes=shapes,
                              verbose=False)


def _check_against_torch(module: Any, spec: ArchSpec, model: onnx.ModelProto, shape: tuple[int, int],
                         label: str) -> None:
    import torch

    from passes.testing import run_model

    feeds = _example_inputs(spec, shape)
    with torch.no_grad():
        expected = module(*(torch.from_numpy(v) for v in feeds.values())).numpy()
    got = run_model(model, feeds)[spec.output]
    if got.shape != expected.shape or not np.allclose(got, expected, rtol=CHECK_RTOL, atol=CHECK_ATOL):
        error = np.abs(got - expected).max() if got.shape == expected.shape else "shape"
        raise ExportError(
            f"{label} does not reproduce PyTorch at shape {shape}: got {list(got.shape)}, "
            f"expected {list(expected.shape)}, max abs error {error}"
        )
