"""The `Pass` base class and its result type.

A pass is a frozen dataclass: its options are typed fields, its name a kebab-case class variable.
Subclasses implement `call(graph) -> PassResult` and mutate the graphsurgeon graph in place; the base
class wraps that in `__call__`, which checks the contract: `requires` before, `ensures` after, and a
structural fingerprint proving that a pass reporting `modified=False` really left the graph alone.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import onnx
import onnx_graphsurgeon as gs

from passes.core import ir
from passes.core.errors import PassContractError, PipelineError

_KEBAB = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")

StatValue = int | float | str | bool


@dataclass(frozen=True)
class Refusal:
    """A rewrite that matched but was not applied, and why (shown by `passes opt --explain`)."""

    node: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"node": self.node, "reason": self.reason}


@dataclass
class PassResult:
    """What a pass returns: the (possibly rewritten) model, whether it changed, and counters."""

    model: gs.Graph | onnx.ModelProto
    modified: bool
    stats: dict[str, StatValue] = field(default_factory=dict)
    refusals: list[Refusal] = field(default_factory=list)


@dataclass(frozen=True)
class OptionInfo:
    """One pass option, as `passes list` shows it."""

    name: str
    type: str
    default: str
    help: str


@dataclass(frozen=True)
class Pass(abc.ABC):
    """Base class of every pass. Subclasses are frozen dataclasses that set `name` and implement `call`."""

    name: ClassVar[str] = ""
    #: False for passes that change numerics on purpose (quantization, fp16): the generic property
    #: test then checks validity and idempotence, and the pass's own tests state its accuracy bound.
    exact: ClassVar[bool] = True
    #: a second run on the pass's own output changes nothing (the generic property test holds every
    #: registered pass to it); the pass manager then skips re-running it on a graph nothing else touched.
    #: Set False for a pass that makes one step per run and relies on a fixpoint to repeat it.
    idempotent: ClassVar[bool] = True
    #: every change the pass makes removes nodes that nothing reads (eliminate-dead-code)
    only_removes_dead_nodes: ClassVar[bool] = False
    #: removing nodes that nothing reads never gives the pass new work: it decides from what nodes
    #: compute, not from who reads them (a fixpoint round then ends without rerunning it after dead-code
    #: removal; with contracts checked the manager reruns it anyway and fails if it changes anything)
    blind_to_dead_code: ClassVar[bool] = False
    #: the pass turns Constant nodes into initializers before anything else (`passes.core._lift`'s rule): a
    #: pipeline that runs it imports the model with them lifted, and the pass finds none left to lift
    lifts_constant_nodes: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name") and not _KEBAB.match(cls.name):
            raise TypeError(f"pass name {cls.name!r} of {cls.__qualname__} is not kebab-case")

    # -- what subclasses implement -------------------------------------------------------------
    @abc.abstractmethod
    def call(self, graph: gs.Graph) -> PassResult:
        """Rewrite `graph` in place and return `PassResult(graph, modified, stats)`."""

    def requires(self, graph: gs.Graph) -> None:
        """Raise (via `self.violation`) when the graph is not something this pass can run on."""

    def ensures(self, graph: gs.Graph) -> None:
        """Raise (via `self.violation`) when the pass's postcondition does not hold."""

    # -- the checked entry point ---------------------------------------------------------------
    def __call__(self, model: gs.Graph | onnx.ModelProto, *, check_contract: bool = True) -> PassResult:
        """Run the pass with its contract checked. A ModelProto in gives a ModelProto out."""
        graph = ir.import_graph(model) if isinstance(model, onnx.ModelProto) else model
        result, _ = self.run_checked(graph, check_contract=check_contract)
        if isinstance(model, onnx.ModelProto):
            result.model = ir.export_model(graph)
        return result

    def run_checked(
        self, graph: gs.Graph, *, check_contract: bool = True, fingerprint: int | None = None
    ) -> tuple[PassResult, int | None]:
        """Run on a graph with `requires`, `ensures` and the modified-flag check.

        The modified-flag check compares `ir.fingerprint` (the whole structure) before and after with
        `check_contract`, else `ir.node_identity` (which nodes, a hundred times cheaper: catches a pass that
        adds, removes or replaces nodes and says it did not). `fingerprint` is the graph's hash of that
        kind when the caller already knows it (the pass manager carries it from one unmodifying pass to
        the next); the hash after the pass is returned when known, else None."""
        digest = ir.fingerprint if check_contract else ir.node_identity
        self.requires(graph)
        before = fingerprint if fingerprint is not None else digest(graph)
        result = self.call(graph)
        if not isinstance(result, PassResult) or result.model is not graph:
            raise PassContractError(f"pass {self.name!r} must return PassResult for the graph it was given")
        if result.modified:
            self.ensures(graph)
            return result, None
        if digest(graph) != before:
            raise PassContractError(f"pass {self.name!r} reported modified=False but changed the graph")
        return result, before

    def violation(self, message: str) -> PassContractError:
        """An error for a failed `requires`/`ensures`, naming this pass."""
        return PassContractError(f"pass {self.name!r}: {message}")

    # -- options -------------------------------------------------------------------------------
    @classmethod
    def summary(cls) -> str:
        """The first line of the class docstring."""
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    @classmethod
    def options(cls) -> list[OptionInfo]:
        hints = typing.get_type_hints(cls)
        infos = []
        for f in dataclasses.fields(cls):
            default = _field_default(f)
            infos.append(
                OptionInfo(f.name, _type_name(hints[f.name]), format_option(default), f.metadata.get("help", ""))
            )
        return infos

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> Pass:
        """Build the pass from `{key: text}` options of a pipeline string, converting by field type."""
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, text in options.items():
            attr = key.replace("-", "_")
            if attr not in fields:
                valid = ", ".join(fields) or "none"
                raise PipelineError(f"pass {cls.name!r} has no option {key!r} (options: {valid})")
            try:
                values[attr] = parse_option(hints[attr], text)
            except ValueError as err:
                raise PipelineError(f"pass {cls.name!r} option {key!r}: {err}") from err
            _check_range(cls.name, key, values[attr], fields[attr])
        try:
            return cls(**values)
        except (TypeError, ValueError) as err:
            raise PipelineError(f"pass {cls.name!r}: {err}") from err

    def spec(self) -> str:
        """The pipeline-string form of this pass instance, e.g. `fold-constants{max_bytes=1024}`."""
        changed = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value != _field_default(f):
                changed.append(f"{f.name}={format_option(value)}")
        return f"{self.name}{{{','.join(changed)}}}" if changed else self.name


def _check_range(pass_name: str, key: str, value: Any, f: dataclasses.Field[Any]) -> None:
    """Numbers are finite and inside the field's `min`/`max` metadata (bounds included)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise PipelineError(f"pass {pass_name!r} option {key!r} must be a finite number, got {value}")
    low, high = f.metadata.get("min"), f.metadata.get("max")
    if low is not None and value < low:
        raise PipelineError(f"pass {pass_name!r} option {key!r} must be at least {low}, got {value}")
    if high is not None and value > high:
        raise PipelineError(f"pass {pass_name!r} option {key!r} must be at most {high}, got {value}")


def _field_default(f: dataclasses.Field[Any]) -> Any:
    """A field's default value (its factory called), or None when it has none."""
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return f.default if f.default is not dataclasses.MISSING else None


def parse_option(hint: Any, text: str) -> Any:
    """Convert option text to the field's type: bool, int, float, str, Literal, Enum, tuple[int, ...]."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        non_none = [a for a in args if a is not type(None)]
        if text.lower() in ("none", "") and len(non_none) < len(args):
            return None
        return parse_option(non_none[0], text)
    if hint is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true/false, got {text!r}")
    if hint is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"expected an integer, got {text!r}") from None
    if hint is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
    if hint is str:
        return text
    if origin is typing.Literal:
        if text not in args:
            raise ValueError(f"expected one of {', '.join(map(str, args))}, got {text!r}")
        return text
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        for member in hint:
            if text in (member.name.lower(), str(member.value)):
                return member
        raise ValueError(f"expected one of {', '.join(str(m.value) for m in hint)}, got {text!r}")
    if origin is tuple and args and args[0] is int:
        return parse_dims(text)
    raise ValueError(f"options of type {hint!r} cannot be set from a pipeline string")


def parse_dims(text: str) -> tuple[int, ...]:
    """`1x128` -> (1, 128). Dims must be positive integers."""
    parts = text.lower().split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"expected dims like 1x128, got {text!r}") from None
    if not dims or any(d <= 0 for d in dims):
        raise ValueError(f"dims must be positive integers like 1x128, got {text!r}")
    return dims


def format_option(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, tuple) and all(isinstance(v, int) for v in value) and value:
        return "x".join(map(str, value))
    if isinstance(value, Mapping):
        return ",".join(f"{k}={format_option(v)}" for k, v in value.items())
    return "none" if value is None else str(value)


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return "|".join(map(str, typing.get_args(hint)))
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "|".join(str(m.value) for m in hint)
    if origin is tuple:
        return "dims"
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))
