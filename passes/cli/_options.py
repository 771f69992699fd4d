"""Options the commands share: --shape, --json, --debug, and the quantization quality options of `passes run`."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from passes.core.errors import PipelineError
from passes.frontend.prepare import DEFAULT_MIN_LAYER_SQNR, DEFAULT_SMOOTH

F = TypeVar("F", bound=Callable[..., Any])


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
