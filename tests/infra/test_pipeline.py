"""Pipeline strings, the registry and plugin discovery."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import metadata
from typing import Literal

import onnx_graphsurgeon as gs
import pytest

from passes import Pass, PassResult, parse_pipeline
from passes.core.errors import PipelineError
from passes.infra.pipeline import Fixpoint, with_input_shapes
from passes.infra.registry import BUILTIN_PASSES, PassRegistry
from passes.transforms.fold_constants import FoldConstants
from passes.transforms.freeze_shapes import FreezeShapes


@dataclass(frozen=True)
class _Options(Pass):
    """A pass with one option of every parseable type."""

    name = "options-probe"
    count: int = 1
    ratio: float = 0.5
    flag: bool = False
    mode: Literal["a", "b"] = "a"
    dims: tuple[int, ...] = (1,)
    label: str = field(default="x", metadata={"help": "free text"})

    def call(self, graph: gs.Graph) -> PassResult:
        return PassResult(graph, False)


def test_parse_sequence_and_options() -> None:
    pipeline = parse_pipeline("eliminate-dead-code, fold-constants{max_bytes=64,fold_shapes=false}")
    first, second = pipeline.elements
    assert first.name == "eliminate-dead-code"
    assert second == FoldConstants(max_bytes=64, fold_shapes=False)


def test_spec_round_trips() -> None:
    text = "freeze-shapes{input_ids=1x128},fixpoint{max_rounds=3}(fold-constants{max_bytes=8},eliminate-dead-code)"
    pipeline = parse_pipeline(text)
    assert pipeline.spec() == text
    assert parse_pipeline(pipeline.spec()) == pipeline


def test_fixpoint_group_and_named_pipeline() -> None:
    pipeline = parse_pipeline("cleanup")
    (group,) = pipeline.elements
    assert isinstance(group, Fixpoint) and group.max_rounds == 8
    assert [p.name for p in pipeline.passes()] == [
        "eliminate-identity", "fold-constants", "eliminate-common-subexpressions", "eliminate-dead-code"
    ]


def test_freeze_shapes_takes_input_names_as_options() -> None:
    (freeze,) = parse_pipeline("freeze-shapes{input_ids=1x128,attention_mask=1x128}").elements
    assert freeze == FreezeShapes(shapes={"input_ids": (1, 128), "attention_mask": (1, 128)})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty pipeline"),
        ("no-such-pass", "unknown pass 'no-such-pass' (`passes list` shows all "),
        ("fold-constants{nope=1}", "no option 'nope' (options: max_bytes, fold_shapes)"),
        ("fold-constants{max_bytes=big}", "expected an integer"),
        ("fold-constants{fold_shapes=maybe}", "expected true/false"),
        ("fold-constants{max_bytes=1,max_bytes=2}", "given twice"),
        ("fold-constants{max_bytes}", "expected '='"),
        ("fixpoint(fold-constants", "expected ')'"),
        ("fixpoint{max_rounds=0}(fold-constants)", "at least 1"),
        ("fixpoint{rounds=2}(fold-constants)", "no option 'rounds'"),
        ("cleanup{x=1}", "takes no options"),
        ("fold-constants,,eliminate-dead-code", "expected a pass name"),
        ("freeze-shapes{input_ids=1xZ}", "dims like 1x128"),
        ("freeze-shapes{input_ids=0x4}", "positive"),
    ],
)
def test_bad_pipelines_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(PipelineError) as info:
        parse_pipeline(text)
    assert message in str(info.value)


def test_unknown_pass_suggests_the_close_names() -> None:
    with pytest.raises(PipelineError) as info:
        parse_pipeline("fold-constant")
    assert "did you mean 'fold-constants'?" in str(info.value)
    assert f"shows all {len(BUILTIN_PASSES)})" in str(info.value)
    with pytest.raises(PipelineError) as info:
        parse_pipeline("fuse-rms-nrom")
    assert "did you mean 'fuse-rms-norm'" in str(info.value)


def test_option_types_parse_from_strings() -> None:
    parsed = _Options.from_options({"count": "3", "ratio": "0.25", "flag": "yes", "mode": "b", "dims": "2x3", "label": "hi"})
    assert parsed == _Options(3, 0.25, True, "b", (2, 3), "hi")
    assert parsed.spec() == "options-probe{count=3,ratio=0.25,flag=true,mode=b,dims=2x3,label=hi}"
    with pytest.raises(PipelineError, match="expected one of a, b"):
        _Options.from_options({"mode": "c"})
    info = {o.name: o for o in _Options.options()}
    assert info["mode"].type == "a|b" and info["dims"].type == "dims" and info["label"].help == "free text"


def test_pass_names_must_be_kebab_case() -> None:
    with pytest.raises(TypeError, match="kebab-case"):

        @dataclass(frozen=True)
        class Bad(Pass):
            name = "Bad_Name"

            def call(self, graph: gs.Graph) -> PassResult:
                return PassResult(graph, False)


def test_registry_is_lazy_and_registers_explicitly() -> None:
    registry = PassRegistry(entry_point_group=None)
    assert "options-probe" not in registry.names()
    registry.register(_Options)
    assert registry.get("options-probe") is _Options
    assert parse_pipeline("options-probe{count=2}", registry=registry).elements == (_Options(count=2),)

    @dataclass(frozen=True)
    class Impostor(Pass):
        name = "fold-constants"

        def call(self, graph: gs.Graph) -> PassResult:
            return PassResult(graph, False)

    with pytest.raises(PipelineError, match="already registered"):
        registry.register(Impostor)


def test_every_builtin_resolves_to_a_pass_of_that_name() -> None:
    registry = PassRegistry(entry_point_group=None)
    for name in BUILTIN_PASSES:
        cls = registry.get(name)
        assert issubclass(cls, Pass) and cls.name == name and cls.summary()
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen  # type: ignore[attr-defined]


def test_plugins_come_from_the_entry_point_group(monkeypatch: pytest.MonkeyPatch) -> None:
    good = metadata.EntryPoint("probe", f"{__name__}:_Options", "passes.plugins")
    broken = metadata.EntryPoint("broken", "no_such_module_xyz:Thing", "passes.plugins")
    monkeypatch.setattr(metadata, "entry_points", lambda group: [good, broken] if group == "passes.plugins" else [])
    registry = PassRegistry()
    assert registry.get("options-probe") is _Options
    assert "options-probe" in registry.names()


def test_input_shapes_prepend_or_fill_freeze_shapes() -> None:
    prepended = with_input_shapes(parse_pipeline("cleanup"), {"x": [1, 4]})
    assert prepended.elements[0] == FreezeShapes(shapes={"x": (1, 4)})
    filled = with_input_shapes(parse_pipeline("fold-constants,freeze-shapes{y=2}"), {"x": [1, 4]})
    assert filled.elements[1] == FreezeShapes(shapes={"x": (1, 4), "y": (2,)})
    assert with_input_shapes(parse_pipeline("cleanup"), None) == parse_pipeline("cleanup")
