"""Weights outside the code: lift a lowered module's constants into function parameters, write them once
as a TVM tensor cache, load them back.

    module', weights = lift_weights(module)      # every Relax function takes (inputs..., *weights)
    write_params(weights, folder / "params")     # tensor-cache.json + params_shard_*.bin (raw)
    tensors = load_params(folder / "params")     # tvm tensors in the functions' parameter order

Compiled in as constants, a model's weights land in the object file: a 135M-parameter model made a
189 MB `model.tar`, and a 7B model would make a 7 GB one compiled for hours. Lifted, the library holds
code only and the weights are one folder in the format TVM's runtime reads on Android and iOS
(`tvm.contrib.tvmjs`'s tensor cache, as MLC-LLM ships its parameter shards), with raw little-endian
shards an app can memory-map. Every Relax function of the module (a generator's `prefill` and `decode`)
takes the same weight list, so weights both phases read are stored once: constants are matched by
dtype, shape and content, whatever layout pass made them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import relax

#: constants smaller than this stay in the code (scalars, shape vectors, small masks)
MIN_LIFTED_BYTES = 4096
#: the tensor cache's index file
INDEX = "tensor-cache.json"


def lift_weights(module: tvm.IRModule, min_bytes: int = MIN_LIFTED_BYTES) -> tuple[tvm.IRModule, dict[str, np.ndarray]]:
    """Replace every constant of at least `min_bytes` in the module's Relax functions by a parameter
    appended to each function (the same list, in the same order, for every function); return the module
    and {parameter name: value}. Equal constants (dtype, shape, bytes) become one parameter; a value is a
    numpy view of the constant's own memory (no copy).""" 
    table: dict[tuple, str] = {}
    weights: dict[str, np.ndarray] = {}
    names: dict[Any, str] = {}  # each constant object -> its parameter (read and hashed once)
    functions = [(gvar, func) for gvar, func in module.functions_items() if isinstance(func, relax.Function)]
    for _, func in functions:
        def visit(expr: relax.Expr) -> None:
            if isinstance(expr, tvm.ir.GenericConst) and expr not in names:  # (IntImm is a tvm.ir.Constant too)
                stored = expr.value
                if int(np.prod(stored.shape, dtype=np.int64)) * np.dtype(str(stored.dtype)).itemsize >= min_bytes:
                    key = _key(stored.numpy())  # a copy for the hash alone, one constant at a time
                    if key not in table:
                        table[key] = f"param_{len(table)}"
                        weights[table[key]] = _view(stored)
                    names[expr] = table[key]

        relax.analysis.post_order_visit(func.body, visit)
    if not weights:
        return module, {}
    updated = tvm.IRModule(dict(module.functions_items()), attrs=module.attrs)
    for gvar, func in functions:
        lifted = _Lifter(names, weights)
        body = lifted.visit_expr(func.body)
        params = [*func.params, *(lifted.vars[name] for name in weights)]
        updated[gvar] = relax.Function(params, body, func.ret_ty, func.is_pure, func.attrs)
    return updated, weights


@relax.expr_functor.mutator
class _Lifter(relax.PyExprMutator):
    def __init__(self, names: Mapping[Any, str], weights: Mapping[str, np.ndarray]) -> None:
        super().__init__()
        self.names = names
        self.vars = {name: relax.Var(name, relax.TensorType(value.shape, str(value.dtype)))
                     for name, value in weights.items()}

    def visit_generic_const_(self, const: tvm.ir.GenericConst) -> relax.Expr:  # noqa: N802 (TVM's naming)
        name = self.names.get(const)
        return const if name is None else self.vars[name]


def _view(stored: Any) -> np.ndarray:
    """A numpy view of a TVM tensor's memory (it keeps the tensor alive): the weight is not copied, and
    the module's other copies (a constant each phase folded for itself) go when the old module does."""
    try:
        return np.from_dlpack(stored)
    except (TypeError, RuntimeError, BufferError):
        return stored.numpy()


def _key(value: np.ndarray) -> tuple:
    return (str(value.dtype), value.shape, hashlib.sha256(np.ascontiguousarray(value).data).hexdigest())


def write_params(weights: Mapping[str, np.ndarray], folder: Path, shard_mb: int = 32) -> list[Path]:
    """Write `weights` as a TVM tensor cache (raw shards of at most `shard_mb` MB) into `folder`;
    returns the files written (the index first)."""
    from tvm.contrib.tvmjs import dump_tensor_cache

    folder = Path(folder)
    with contextlib.redirect_stdout(io.StringIO()):  # it reports each shard on stdout
        dump_tensor_cache(dict(weights), str(folder), encode_format="raw", shard_cap_mb=shard_mb,
                          show_progress=False, meta_data={"ParamSize": len(weights), "order": list(weights)})
    return cache_files(folder, read_index(folder))


def read_params(folder: Path) -> dict[str, np.ndarray]:
    """{name: array} of a tensor cache, in the order the functions take them; the arrays map the shard
    files (read-only, nothing copied until used)."""
    folder = Path(folder)
    index = read_index(folder)
    found: dict[str, np.ndarray] = {}
    for shard in index["records"]:
        data = np.memmap(folder / shard["dataPath"], dtype=np.uint8, mode="r")
        for record in shard["records"]:
            start, size = record["byteOffset"], record["nbytes"]
            found[record["name"]] = data[start:start + size].view(np.dtype(record["dtype"])).reshape(record["shape"])
    return {name: found[name] for name in param_order(index)}


def read_index(folder: Path) -> dict[str, Any]:
    """The tensor cache's index (`tensor-cache.json`) in `folder`."""
    return json.loads((Path(folder) / INDEX).read_text())


def cache_files(folder: Path, index: Mapping[str, Any]) -> list[Path]:
    """The files of the tensor cache in `folder`: the index first, then its shards."""
    return [Path(folder) / INDEX, *(Path(folder) / shard["dataPath"] for shard in index["records"])]


def param_order(index: Mapping[str, Any]) -> list[str]:
    """The parameters' names in the order the functions take them."""
    return index.get("metadata", {}).get("order") or [r["name"] for s in index["records"] for r in s["records"]]


def load_params(folder: Path, device: tvm.runtime.Device | None = None) -> list[tvm.runtime.Tensor]:
    """The tensor cache in `folder` as device tensors, in the functions' parameter order."""
    device = device or tvm.cpu()
    return [tvm.runtime.tensor(np.ascontiguousarray(value), device) for value in read_params(folder).values()]
