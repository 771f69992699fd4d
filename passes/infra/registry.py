"""The pass registry: pass names -> pass classes, imported only when first asked for.

Built-in passes are a static table of `name -> "module:Class"` strings, so `import passes` imports no
pass module. Third-party passes come from the `passes.plugins` entry-point group (each entry point
loads a `Pass` subclass, or a list of them) or from an explicit `register_pass(cls)` call.
"""

from __future__ import annotations

import difflib
import importlib
import logging
from collections.abc import Iterable, Mapping
from importlib import metadata
from types import MappingProxyType
from typing import TypeVar

from passes.infra._pass import Pass
from passes.core.errors import PipelineError

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "passes.plugins"

BUILTIN_PASSES: Mapping[str, str] = MappingProxyType(
    {
        "eliminate-dead-code": "passes.transforms.eliminate_dead_code:EliminateDeadCode",
        "eliminate-identity": "passes.transforms.eliminate_identity:EliminateIdentity",
        "eliminate-common-subexpressions": (
            "passes.transforms.eliminate_common_subexpressions:EliminateCommonSubexpressions"
        ),
        "fold-constants": "passes.transforms.fold_constants:FoldConstants",
        "freeze-shapes": "passes.transforms.freeze_shapes:FreezeShapes",
        "fold-transpose": "passes.transforms.fold_transpose:FoldTranspose",
        "pack-matmul-weights": "passes.transforms.pack_matmul_weights:PackMatmulWeights",
        "static-kv-cache": "passes.transforms.static_kv_cache:StaticKvCache",
        "group-query-attention": "passes.transforms.group_query_attention:GroupQueryAttention",
        "decompose-layer-norm": "passes.transforms.decompose_layer_norm:DecomposeLayerNorm",
        "decompose-rms-norm": "passes.transforms.decompose_rms_norm:DecomposeRmsNorm",
        "decompose-gelu": "passes.transforms.decompose_gelu:DecomposeGelu",
        "fuse-layer-norm": "passes.transforms.fuse_layer_norm:FuseLayerNorm",
        "fuse-rms-norm": "passes.transforms.fuse_rms_norm:FuseRmsNorm",
        "fuse-gelu": "passes.transforms.fuse_gelu:FuseGelu",
        "fuse-matmul-add": "passes.transforms.fuse_matmul_add:FuseMatMulAdd",
        "fuse-qkv": "passes.transforms.fuse_qkv:FuseQkv",
        "quantize-int8": "passes.transforms.quantize_int8:QuantizeInt8",
        "smooth-quant": "passes.transforms.smooth_quant:SmoothQuant",
        "to-fp16": "passes.transforms.to_fp16:ToFp16",
        "einsum-to-matmul": "passes.transforms.einsum_to_matmul:EinsumToMatMul",
        "matmul-to-einsum": "passes.transforms.matmul_to_einsum:MatMulToEinsum",
    }
)

PassT = TypeVar("PassT", bound=type[Pass])


class PassRegistry:
    """Looks passes up by name: built-ins, then explicit registrations, then entry-point plugins."""

    def __init__(
        self,
        builtins: Mapping[str, str] = BUILTIN_PASSES,
        *,
        entry_point_group: str | None = ENTRY_POINT_GROUP,
    ) -> None:
        self._builtins = dict(builtins)
        self._classes: dict[str, type[Pass]] = {}
        self._group = entry_point_group
        self._plugins_loaded = entry_point_group is None

    def register(self, cls: PassT) -> PassT:
        """Add a pass class under its `name`; a name already taken by another class is an error."""
        if not (isinstance(cls, type) and issubclass(cls, Pass)) or not cls.name:
            raise PipelineError(f"{cls!r} is not a Pass subclass with a name")
        existing = self._classes.get(cls.name)
        if (existing is not None and existing is not cls) or (
            existing is None and cls.name in self._builtins and self._load_builtin(cls.name) is not cls
        ):
            raise PipelineError(f"pass name {cls.name!r} is already registered")
        self._classes[cls.name] = cls
        return cls

    def get(self, name: str) -> type[Pass]:
        """The class registered as `name`, or a `PipelineError` that lists the valid names."""
        if name in self._classes:
            return self._classes[name]
        if name in self._builtins:
            return self._load_builtin(name)
        self._load_plugins()
        if name in self._classes:
            return self._classes[name]
        close = difflib.get_close_matches(name, self.names(), n=3, cutoff=0.6) if len(name) <= 200 else []
        guess = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise PipelineError(f"unknown pass {name!r}{guess} (`passes list` shows all {len(self.names())})")

    def names(self) -> list[str]:
        self._load_plugins()
        return sorted(set(self._builtins) | set(self._classes))

    def all(self) -> dict[str, type[Pass]]:
        """Every registered pass, imported (for `passes list` and the generic property test)."""
        return {name: self.get(name) for name in self.names()}

    def _load_builtin(self, name: str) -> type[Pass]:
        module_name, _, attr = self._builtins[name].partition(":")
        cls = getattr(importlib.import_module(module_name), attr)
        self._classes[name] = cls
        return cls

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for entry_point in metadata.entry_points(group=self._group or ""):
            try:
                loaded = entry_point.load()
            except Exception as err:  # a broken plugin must not break the tool; say which one
                logger.warning("cannot load pass plugin %r: %s", entry_point.name, err)
                continue
            for cls in loaded if isinstance(loaded, Iterable) else [loaded]:
                try:
                    self.register(cls)
                except PipelineError as err:
                    logger.warning("pass plugin %r: %s", entry_point.name, err)


_DEFAULT_REGISTRY: PassRegistry | None = None


def default_registry() -> PassRegistry:
    """The process-wide registry that pipeline strings and `register_pass` use."""
    global _DEFAULT_REGISTRY
    if _DEFAULT_REGISTRY is None:
        _DEFAULT_REGISTRY = PassRegistry()
    return _DEFAULT_REGISTRY


def register_pass(cls: PassT) -> PassT:
    """Register a third-party pass class (usable as a decorator) so pipeline strings can name it."""
    return default_registry().register(cls)

