"""Pipelines: sequences of passes and fixpoint groups, and the pipeline-string parser.

Grammar (whitespace is ignored)::

    pipeline := element ("," element)*
    element  := "fixpoint" options? "(" pipeline ")"   # repeat until no pass modifies the graph
              | NAME options?                           # a registered pass or a named pipeline
    options  := "{" [KEY "=" VALUE ("," KEY "=" VALUE)*] "}"

e.g. `eliminate-dead-code,fixpoint{max_rounds=4}(fold-constants,eliminate-identity),freeze-shapes{input_ids=1x128}`.
Named pipelines (`canonicalize`, `cleanup`) expand in place; they take no options.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from passes.infra._pass import Pass
from passes.core.errors import PipelineError
from passes.infra.registry import PassRegistry, default_registry

CLEANUP = "fixpoint(eliminate-identity,fold-constants,eliminate-common-subexpressions,eliminate-dead-code)"
#: fusions that hold on every back end: each refuses (with its reason) where the graph's opset lacks
#: the fused op; fuse-qkv must run before fuse-matmul-add, which would otherwise claim the biases.
FUSIONS = "fold-transpose,fuse-layer-norm,fuse-rms-norm,fuse-gelu,fuse-qkv,fuse-matmul-add{high_rank=keep-matmul}"

#: Named pipelines usable wherever a pipeline string is accepted.
NAMED_PIPELINES: Mapping[str, str] = MappingProxyType(
    {
        "cleanup": CLEANUP,
        "fusions": FUSIONS,
        # target-independent canonical form; freeze-shapes is prepended when input shapes are given
        "canonicalize": f"{CLEANUP},{FUSIONS},{CLEANUP}",
    }
)
DEFAULT_PIPELINE = "canonicalize"
DEFAULT_MAX_ROUNDS = 8


@dataclass(frozen=True)
class Fixpoint:
    """Run `elements` repeatedly until a round modifies nothing; raise after `max_rounds` rounds."""

    elements: tuple[PipelineElement, ...]
    max_rounds: int = DEFAULT_MAX_ROUNDS

    def spec(self) -> str:
        options = "" if self.max_rounds == DEFAULT_MAX_ROUNDS else f"{{max_rounds={self.max_rounds}}}"
        return f"fixpoint{options}({','.join(e.spec() for e in self.elements)})"


PipelineElement = Pass | Fixpoint


@dataclass(frozen=True)
class Pipeline:
    """An ordered sequence of passes and fixpoint groups."""

    elements: tuple[PipelineElement, ...]

    def spec(self) -> str:
        """The canonical pipeline string; parsing it gives an equal pipeline."""
        return ",".join(e.spec() for e in self.elements)

    def passes(self) -> Iterator[Pass]:
        """Every pass instance, depth first."""
        yield from _walk(self.elements)

    def __str__(self) -> str:
        return self.spec()


def _walk(elements: Sequence[PipelineElement]) -> Iterator[Pass]:
    for element in elements:
        if isinstance(element, Fixpoint):
            yield from _walk(element.elements)
        else:
            yield element


#: fixpoint(...) groups nest at most this deep (a parser of bounded depth: no RecursionError)
MAX_NESTING = 16

_TOKEN = re.compile(r"\s*(?:(?P<punct>[,{}()=])|(?P<word>[^,{}()=\s]+))")


class _Parser:
    def __init__(self, text: str, registry: PassRegistry) -> None:
        self.text = text
        self.registry = registry
        self.tokens = self._tokenize(text)
        self.pos = 0
        self.depth = 0

    def _tokenize(self, text: str) -> list[str]:
        tokens, index = [], 0
        while index < len(text):
            match = _TOKEN.match(text, index)
            if match is None or match.end() == index:
                if text[index:].strip() == "":
                    break
                raise PipelineError(f"pipeline {text!r}: unexpected character at position {index}")
            tokens.append(match.group("punct") or match.group("word"))
            index = match.end()
        return tokens

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def expect(self, token: str) -> None:
        found = self.peek()
        if found != token:
            where = f"got {found!r}" if found is not None else "got the end"
            raise PipelineError(f"pipeline {self.text!r}: expected {token!r}, {where}")
        self.pos += 1

    def pipeline(self) -> list[PipelineElement]:
        elements = self.element()
        while self.peek() == ",":
            self.pos += 1
            elements += self.element()
        return elements

    def element(self) -> list[PipelineElement]:
        name = self.peek()
        if name is None or name in ",{}()=":
            raise PipelineError(f"pipeline {self.text!r}: expected a pass name, got {name or 'the end'!r}")
        self.pos += 1
        options = self.options() if self.peek() == "{" else {}
        if name == "fixpoint":
            return [self.fixpoint(options)]
        if name in NAMED_PIPELINES:
            if options:
                raise PipelineError(f"named pipeline {name!r} takes no options")
            return list(parse_pipeline(NAMED_PIPELINES[name], registry=self.registry).elements)
        return [self.registry.get(name).from_options(options)]

    def fixpoint(self, options: dict[str, str]) -> Fixpoint:
        unknown = set(options) - {"max_rounds"}
        if unknown:
            raise PipelineError(f"fixpoint has no option {sorted(unknown)[0]!r} (options: max_rounds)")
        try:
            rounds = int(options.get("max_rounds", DEFAULT_MAX_ROUNDS))
        except ValueError:
            raise PipelineError(f"fixpoint max_rounds must be an integer, got {options['max_rounds']!r}") from None
        if rounds < 1:
            raise PipelineError("fixpoint max_rounds must be at least 1")
        self.expect("(")
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise PipelineError(f"pipeline nests fixpoint(...) deeper than {MAX_NESTING} levels")
        inner = self.pipeline()
        self.depth -= 1
        self.expect(")")
        return Fixpoint(tuple(inner), rounds)

    def options(self) -> dict[str, str]:
        self.expect("{")
        options: dict[str, str] = {}
        while self.peek() != "}":
            key = self.peek()
            if key is None or key in ",{}()=":
                raise PipelineError(f"pipeline {self.text!r}: expected an option name, got {key or 'the end'!r}")
            self.pos += 1
            self.expect("=")
            value = self.peek()
            if value is None or value in ",{}()=":
                raise PipelineError(f"pipeline {self.text!r}: option {key!r} has no value")
            self.pos += 1
            if key in options:
                raise PipelineError(f"pipeline {self.text!r}: option {key!r} given twice")
            options[key] = value
            if self.peek() == ",":
                self.pos += 1
            elif self.peek() != "}":
                self.expect("}")
        self.pos += 1
        return options


def parse_pipeline(text: str, *, registry: PassRegistry | None = None) -> Pipeline:
    """Parse a pipeline string into pass instances; errors name the problem and the valid choices."""
    if not text or not text.strip():
        raise PipelineError("empty pipeline")
    parser = _Parser(text, registry or default_registry())
    elements = parser.pipeline()
    if parser.peek() is not None:
        raise PipelineError(f"pipeline {text!r}: unexpected {parser.peek()!r}")
    return Pipeline(tuple(elements))


def as_pipeline(pipeline: str | Pipeline | Sequence[PipelineElement] | None) -> Pipeline:
    """Accept a pipeline string, a Pipeline, a sequence of passes/fixpoints, or None (the default)."""
    if pipeline is None:
        return parse_pipeline(DEFAULT_PIPELINE)
    if isinstance(pipeline, str):
        return parse_pipeline(pipeline)
    if isinstance(pipeline, Pipeline):
        return pipeline
    elements = tuple(pipeline)
    for element in elements:
        if not isinstance(element, (Pass, Fixpoint)):
            raise PipelineError(f"pipeline elements must be Pass or Fixpoint instances, got {element!r}")
    return Pipeline(elements)


def with_input_shapes(pipeline: Pipeline, input_shapes: Mapping[str, Sequence[int]] | None) -> Pipeline:
    """Bind input shapes: fill them into the pipeline's freeze-shapes, or prepend one."""
    if not input_shapes:
        return pipeline
    shapes = {name: tuple(int(d) for d in dims) for name, dims in input_shapes.items()}
    freeze_cls = default_registry().get("freeze-shapes")
    if any(isinstance(p, freeze_cls) for p in pipeline.passes()):
        return Pipeline(tuple(_bind(e, freeze_cls, shapes) for e in pipeline.elements))
    return Pipeline((freeze_cls(shapes=shapes), *pipeline.elements))


def _bind(element: PipelineElement, freeze_cls: type[Pass], shapes: dict[str, tuple[int, ...]]) -> PipelineElement:
    if isinstance(element, Fixpoint):
        return Fixpoint(tuple(_bind(e, freeze_cls, shapes) for e in element.elements), element.max_rounds)
    if isinstance(element, freeze_cls):
        merged = {**shapes, **dict(getattr(element, "shapes"))}
        return dataclasses.replace(element, shapes=merged)
    return element
