"""Options the commands share: --shape, --json, --debug, and the quantization quality options of `passes run`."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from passes.core.errors import PipelineError
from passes.frontend.prepare import DEFAULT_MIN_LAYER_SQNR, DEFAULT_SMOOTH

F = TypeVar("F", bound=Callable[..., Any])


class ModelFile(click.Path):
    """A model file to write: a `Path`; a name ending in '/' (a folder, existing or not) is refused."""

    def __init__(self) -> None:
        super().__init__(dir_okay=False, path_type=Path)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and value.endswith(("/", os.sep)):
            self.fail(f"{value!r} names a folder (trailing '/'); give the model file's name", param, ctx)
        return super().convert(value, param, ctx)


class Tolerance(click.ParamType):
    """A finite, non-negative float (`nan` and `inf` would make every comparison pass or fail)."""

    name = "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number) or number < 0:
            self.fail(f"{value!r}: a tolerance is a finite number >= 0", param, ctx)
        return number


#: seeds numpy takes (SeedSequence entropy is unbounded, but a seed past 2**63 is a typo)
SEED = click.IntRange(min=0, max=2**63 - 1)


def _debug_option(func: F) -> F:
    return click.option("--debug", is_flag=True, expose_value=False, help="Show tracebacks on errors.")(func)


def _parse_shapes(values: Sequence[str]) -> dict[str, tuple[int, ...]]:
    from passes.infra._pass import parse_dims

    shapes: dict[str, tuple[int, ...]] = {}
    for value in values:
        name, sep, dims = value.partition("=")
        if not sep or not name:
            raise PipelineError(f"--shape: expected NAME=DIMS like input_ids=1x128, got {value!r}")
        try:
            shapes[name] = parse_dims(dims)
        except ValueError as err:
            raise PipelineError(f"--shape {value}: {err}") from None
    return shapes


_SIZE_SUFFIX = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_bytes(text: str) -> int:
    """'4096', '512M', '2G', '1.5GiB' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if match is None:
        raise click.BadParameter(f"expected a size like 512M or 2G, got {text!r}")
    return int(float(match.group(1)) * _SIZE_SUFFIX[match.group(2)])


def _set_feed_budget(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    from passes.numerics.verify import max_feed_bytes

    if value is not None:  # the budget holds while the command runs and ends with its click context
        ctx.with_resource(max_feed_bytes(parse_bytes(value)))


_feed_budget_option = click.option(
    "--max-feed-bytes", metavar="SIZE", default=None, expose_value=False, callback=_set_feed_budget,
    help="Refuse generated inputs larger than SIZE in all (e.g. 512M; default: an eighth of RAM).")

_shape_option = click.option(
    "--shape", "shapes", multiple=True, metavar="NAME=DIMS", help="Bind an input's dims, e.g. input_ids=1x128."
)
_json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def quality_options(func: F) -> F:
    """--tokenizer, --text, --smooth, --min-layer-sqnr, --max-ppl-increase, --min-sqnr."""
    for option in reversed(_QUALITY):
        func = option(func)
    return func


_QUALITY = [
    click.option("--tokenizer", type=click.Path(path_type=Path), default=None, metavar="DIR",
                 help="tokenizer.json (or its folder) that cuts --calibration and --text into token windows."),
    click.option("--text", type=click.Path(path_type=Path), default=None, metavar="FILE",
                 help="Text to measure float vs quantized perplexity on (a language model; needs --tokenizer)."),
    click.option("--smooth", type=click.FloatRange(0.0, 1.0), default=DEFAULT_SMOOTH, show_default=True,
                 help="SmoothQuant strength before W8A8 (0 = off)."),
    click.option("--min-layer-sqnr", type=click.FloatRange(0.0, 199.0), default=DEFAULT_MIN_LAYER_SQNR, show_default=True,
                 metavar="DB", help="W8A8 layers whose own SQNR on the calibration set is below this stay W8A16 (0 = off)."),
    click.option("--max-ppl-increase", type=click.FloatRange(min=0.0), default=None, metavar="PCT",
                 help="Fail, writing nothing, if perplexity on --text rises more than PCT percent."),
    click.option("--min-sqnr", type=float, default=None, metavar="DB",
                 help="Fail, writing nothing, if the quantized model's output SQNR is below DB."),
]
