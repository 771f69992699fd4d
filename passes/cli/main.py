"""The `passes` command line: opt, list, verify, inspect, sample, targets.

Human output is rich tables on stdout; `--json` prints one JSON document for scripts. A user mistake
(a bad file, pipeline, option or shape) prints one `error:` line on stderr and exits 2; `--debug`
shows the traceback instead. `verify` exits 1 when the models differ beyond tolerance.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path

import click

from passes.cli._options import SEED, ModelFile, Tolerance, _debug_option, _feed_budget_option, _json_option, _parse_shapes, _print_json, _shape_option, quality_options
from passes.samples import SAMPLE_NAMES

EXIT_MISMATCH = 1


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="passes")
@_debug_option
def cli() -> None:
    """Rewrite transformer ONNX graphs for mobile back ends."""


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=ModelFile(), required=True, help="Where to write the result.")
@click.option("-p", "--pipeline", default="canonicalize", show_default=True, help="Pipeline string or name.")
@_shape_option
@click.option("--dump-ir", type=click.Path(path_type=Path), help="Write every intermediate graph to this folder.")
@click.option("--verify", is_flag=True, help="Compare with the input after every pass (onnxruntime).")
@click.option("--rtol", type=Tolerance(), default=1e-4, show_default=True, help="Relative tolerance for --verify.")
@click.option("--atol", type=Tolerance(), default=1e-5, show_default=True, help="Absolute tolerance for --verify.")
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="Seed of the random inputs for --verify.")
@_feed_budget_option
@click.option("--no-check", is_flag=True, help="Skip the ONNX checker after each pass.")
@click.option("--explain", is_flag=True, help="Show why rewrites that matched were not applied.")
@click.option("--in-place", is_flag=True, help="Allow -o to be the input file.")
@_json_option
@_debug_option
def opt(
    model: Path,
    output: Path,
    pipeline: str,
    shapes: Sequence[str],
    dump_ir: Path | None,
    verify: bool,
    rtol: float,
    atol: float,
    seed: int,
    no_check: bool,
    explain: bool,
    in_place: bool,
    as_json: bool,
) -> None:
    """Rewrite MODEL with a pipeline of passes and write the result to -o."""
    from passes.cli import _render, _status
    from passes.core.io import check_output_path, load_model, save_model
    from passes.infra.manager import PassManager, check_dump_folder

    check_output_path(output, source=model, in_place=in_place)
    if dump_ir is not None:
        check_dump_folder(dump_ir, source=model, output=output)
    with _status.status(enabled=not as_json) as shown:
        manager = PassManager(
            pipeline,
            input_shapes=_parse_shapes(shapes),
            check=not no_check,
            verify=verify,
            rtol=rtol,
            atol=atol,
            seed=seed,
            dump_ir=dump_ir,
            instruments=[shown.instrument],
        )
        manager.resolved_pipeline()  # a bad pipeline fails before the model is read
        shown.stage(f"loading {model}")
        loaded = load_model(model)
        shown.stage("importing the graph")
        result = manager.run(loaded)
        shown.stage(f"writing {output}")
        save_model(result.model, output, source=model, in_place=in_place)
    if as_json:
        _print_json({"output": str(output), **result.report.to_dict()})
    else:
        _render.pipeline_report(result.report, output, explain=explain)


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-t", "--target", "target_spec", required=True, metavar="TARGET",
              help="A bundled target (see `passes targets`), NAME:cpu, or a path to a TOML.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("out"), show_default=True,
              help="Artifacts go to OUTPUT/<target>/.")
@_shape_option
@click.option("-p", "--pipeline", default=None, help="Override the target's pass pipeline.")
@click.option("-q", "--quantize", type=click.Choice(["auto", "none", "w8a8-dynamic", "w8a8-static", "w8a16"]),
              default="auto", show_default=True, help="INT8 scheme; auto = the target's preference.")
@click.option("--calibration", type=click.Path(path_type=Path), default=None,
              help="Calibration inputs: an .npz of inputs by name, or text with --tokenizer (else generated inputs).")
@quality_options
@click.option("--tuning", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Build with the best schedules of a `passes tune` session folder.")
@click.option("--context", type=click.IntRange(min=1), default=None, metavar="N",
              help="KV-cache exports: cache slots (prompt + reply); default: the target's defaults.context.")
@click.option("--prefill-chunk", type=click.IntRange(min=1), default=None, metavar="N",
              help="KV-cache exports: prompt tokens per prefill call; default: the target's defaults.prefill_chunk.")
@_feed_budget_option
@_json_option
@_debug_option
def run(model: Path, target_spec: str, output: Path, shapes: Sequence[str], pipeline: str | None,
        quantize: str, calibration: Path | None, tokenizer: Path | None, text: Path | None, smooth: float,
        min_layer_sqnr: float, max_ppl_increase: float | None, min_sqnr: float | None, tuning: Path | None,
        context: int | None, prefill_chunk: int | None, as_json: bool) -> None:
    """Rewrite MODEL for a target, quantize, lower it through TVM, build, write artifacts and a report."""
    from passes.cli import _render, _status
    from passes.deploy.run import run_for_target
    from passes.frontend.prepare import QuantizeSettings

    settings = QuantizeSettings(quantize, calibration, tokenizer, text, smooth, min_layer_sqnr,  # type: ignore[arg-type]
                                max_ppl_increase, min_sqnr)
    with _status.status(enabled=not as_json) as shown:
        report = run_for_target(model, target_spec, output, input_shapes=_parse_shapes(shapes), pipeline=pipeline,
                                tuning=tuning, settings=settings, instruments=[shown.instrument], on_stage=shown.stage,
                                context=context, prefill_chunk=prefill_chunk)
    if as_json:
        _print_json(report.to_dict())
    else:
        _render.run_report(report)
        if report.generator is not None:
            from passes.cli._render_generate import generator_lines

            generator_lines(report)


@cli.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--prompt-ids", default=None, metavar="1,2,3", help="The prompt as token ids, comma-separated.")
@click.option("--prompt", default=None, metavar="TEXT", help="The prompt as text (needs --tokenizer).")
@click.option("--tokenizer", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="A tokenizer.json, or the folder holding it (for --prompt, and to print the reply).")
@click.option("-n", "--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--no-compare", is_flag=True, help="Skip onnxruntime's run of the same graph (tokens and speed).")
@click.option("--tracker", default=None, metavar="HOST:PORT",
              help="Run on a device registered with this TVM RPC tracker (no authentication: trusted networks only).")
@click.option("--key", default=None, help="Device key the RPC server registered with (with --tracker).")
@click.option("--session-timeout", type=click.FloatRange(min=1), default=600, show_default=True, metavar="SECONDS",
              help="How long the device session may last (with --tracker).")
@_json_option
@_debug_option
def generate(folder: Path, prompt_ids: str | None, prompt: str | None, tokenizer: Path | None, max_new_tokens: int,
             no_compare: bool, tracker: str | None, key: str | None, session_timeout: float, as_json: bool) -> None:
    """Generate greedy tokens with a generator build (FOLDER = `passes run` output for a KV-cache export):
    a host build on this machine, any build on a phone through a TVM RPC tracker (--tracker, --key)."""
    from passes.cli import _render_generate, _status
    from passes.deploy.generate import generate_tokens, parse_prompt_ids
    from passes.lowering._rpc import Tracker

    if key is not None and tracker is None:
        raise click.UsageError("--key needs --tracker HOST:PORT")
    device = Tracker.parse(tracker, key) if tracker is not None else None
    ids = parse_prompt_ids(prompt_ids) if prompt_ids is not None else None
    with _status.status(enabled=not as_json) as shown:
        shown.stage(f"loading the generator in {folder}")
        report = generate_tokens(folder, prompt_ids=ids, prompt=prompt, tokenizer=tokenizer,
                                 max_new_tokens=max_new_tokens, compare=not no_compare, tracker=device,
                                 session_timeout_s=session_timeout, on_stage=shown.stage)
    if as_json:
        _print_json(report.to_dict())
    else:
        _render_generate.generate_report(report)


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-t", "--target", "target_spec", required=True, metavar="TARGET",
              help="A bundled target (see `passes targets`), NAME:cpu, or a path to a TOML.")
@click.option("-s", "--session", type=click.Path(path_type=Path), required=True, metavar="DIR",
              help="Session folder: created, or resumed from its records.")
@click.option("-n", "--trials", type=click.IntRange(min=0), default=64, show_default=True,
              help="New measurements in this run, spread over the kernels by FLOPs share.")
@_shape_option
@click.option("-q", "--quantize", type=click.Choice(["auto", "none", "w8a8-dynamic", "w8a8-static", "w8a16"]),
              default="auto", show_default=True, help="INT8 scheme, as for `passes run`.")
@click.option("--tracker", default=None, metavar="HOST:PORT",
              help="Measure on devices registered with this TVM RPC tracker (no authentication: trusted networks only).")
@click.option("--key", default=None, help="Device key the RPC servers registered with (with --tracker).")
@click.option("--builders", type=click.IntRange(min=1), default=None, help="Build worker processes.")
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True, help="Candidates per search round.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the search.")
@click.option("--int8-only", is_flag=True, help="Tune only the INT8 kernels (passes.kernels), not the other fused kernels.")
@_json_option
@_debug_option
def tune(model: Path, target_spec: str, session: Path, trials: int, shapes: Sequence[str], quantize: str,
         tracker: str | None, key: str | None, builders: int | None, batch: int, seed: int, int8_only: bool,
         as_json: bool) -> None:
    """Autotune the kernels of MODEL for a target; resumable: run it again to go on from the records."""
    from passes.cli import _render_tune
    from passes.lowering._rpc import Tracker
    from passes.tuning import SearchConfig, TuneOptions
    from passes.tuning import tune as tune_session

    if key is not None and tracker is None:
        raise click.UsageError("--key needs --tracker HOST:PORT")
    options = TuneOptions(trials=trials, tracker=Tracker.parse(tracker, key) if tracker else None,
                          search=SearchConfig(batch=batch, seed=seed), int8_only=int8_only,
                          **({"builders": builders} if builders else {}))
    with _render_tune.TuneProgress() if not as_json else contextlib.nullcontext() as display:
        report = tune_session(model, target_spec, session, options, input_shapes=_parse_shapes(shapes),
                              quantize=quantize, on_start=display.start if display else None,
                              on_progress=display.update if display else None)
    if as_json:
        _print_json(report.to_dict())
    else:
        _render_tune.tune_report(report)


@cli.command(name="list")
@_json_option
@_debug_option
def list_passes(as_json: bool) -> None:
    """List the registered passes, their options and the named pipelines."""
    from passes.cli import _render
    from passes.infra.pipeline import NAMED_PIPELINES
    from passes.infra.registry import default_registry

    passes = default_registry().all()
    if as_json:
        _print_json(
            {
                "passes": {
                    name: {"summary": cls.summary(), "options": [vars(o) for o in cls.options()]}
                    for name, cls in passes.items()
                },
                "pipelines": dict(NAMED_PIPELINES),
            }
        )
    else:
        _render.pass_list(passes, NAMED_PIPELINES)


@cli.command()
@click.argument("reference", type=click.Path(path_type=Path))
@click.argument("candidate", type=click.Path(path_type=Path))
@_shape_option
@click.option("--rtol", type=Tolerance(), default=1e-4, show_default=True, help="Relative tolerance.")
@click.option("--atol", type=Tolerance(), default=1e-5, show_default=True, help="Absolute tolerance.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the random inputs.")
@_feed_budget_option
@_json_option
@_debug_option
def verify(
    reference: Path, candidate: Path, shapes: Sequence[str], rtol: float, atol: float, seed: int, as_json: bool
) -> None:
    """Run REFERENCE and CANDIDATE on the same seeded inputs; exit 1 if any output differs."""
    from passes.cli import _render, _status
    from passes.core.io import load_model
    from passes.numerics.verify import compare_models

    input_shapes = _parse_shapes(shapes)
    with _status.status(enabled=not as_json) as shown:
        shown.stage(f"loading {reference}")
        reference_model = load_model(reference)
        shown.stage(f"loading {candidate}")
        candidate_model = load_model(candidate)
        shown.stage("running both on the same inputs")
        comparison = compare_models(reference_model, candidate_model, input_shapes=input_shapes, seed=seed,
                                    rtol=rtol, atol=atol)
    if as_json:
        _print_json(comparison.to_dict())
    else:
        _render.comparison(comparison, reference, candidate)
    if not comparison.ok:
        sys.exit(EXIT_MISMATCH)


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("quantized", type=click.Path(path_type=Path))
@click.option("--text", type=click.Path(path_type=Path), required=True, metavar="FILE",
              help="Text to measure perplexity on (UTF-8).")
@click.option("--tokenizer", type=click.Path(path_type=Path), required=True, metavar="DIR",
              help="tokenizer.json, or the folder holding it.")
@click.option("--windows", type=click.IntRange(1, 1024), default=8, show_default=True,
              help="Windows of the model's sequence length (128 where it is symbolic), spread over the text.")
@click.option("--max-ppl-increase", type=click.FloatRange(min=0.0), default=None, metavar="PCT",
              help="Exit 1 if perplexity rises more than PCT percent.")
@_json_option
@_debug_option
def accuracy(model: Path, quantized: Path, text: Path, tokenizer: Path, windows: int,
             max_ppl_increase: float | None, as_json: bool) -> None:
    """Perplexity of MODEL (float) and QUANTIZED on the same windows of text, and SQNR per layer."""
    from passes.cli import _render
    from passes.core.io import load_model
    from passes.numerics.accuracy import quantization_report
    from passes.numerics.perplexity import TOKEN_INPUT, eval_windows, lm_feeds, perplexity_change

    original, candidate = load_model(model), load_model(quantized)
    rows = eval_windows(original, text, tokenizer, windows)
    change = perplexity_change(original, candidate, rows)
    feeds = [lm_feeds(original, row[None]) for row in rows[:2]]
    report = quantization_report(original, candidate, feeds)
    result = {"perplexity": change, "sqnr": report.to_dict(), "sqnr_inputs": f"the first 2 windows ({TOKEN_INPUT})"}
    if as_json:
        _print_json(result)
    else:
        _render.accuracy_report(change, report)
    if max_ppl_increase is not None and change["increase_pct"] > max_ppl_increase:
        if not as_json:
            click.echo(f"error: perplexity rose {change['increase_pct']:.2f} %, above --max-ppl-increase "
                       f"{max_ppl_increase:g} %", err=True)
        sys.exit(EXIT_MISMATCH)


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@_json_option
@_debug_option
def inspect(model: Path, as_json: bool) -> None:
    """Summarise MODEL: ops, parameters, weight bytes per precision, dynamic dims, opsets."""
    from passes.cli import _render
    from passes.core.io import load_model_with_info
    from passes.deploy.summary import summarize

    loaded = load_model_with_info(model)
    summary = summarize(loaded.model, model, external_data_files=loaded.external_data_files)
    if as_json:
        _print_json(summary.to_dict())
    else:
        _render.model_summary(summary)


@cli.command()
@click.argument("name", type=click.Choice(SAMPLE_NAMES))
@click.option("-o", "--output", type=ModelFile(), required=True, help="Where to write the model.")
@click.option("--idiom", type=click.Choice(["torchscript", "dynamo"]), default="torchscript", show_default=True,
              help="Which exporter's graph idioms to reproduce.")
@click.option("--layers", type=int, default=2, show_default=True)
@click.option("--hidden", type=int, default=64, show_default=True)
@click.option("--heads", type=int, default=4, show_default=True)
@click.option("--vocab", type=int, default=256, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--kv-heads", type=int, default=None, help="Key/value heads, a divisor of --heads (tiny-llama; default: --heads).")
@click.option("--kv-cache", is_flag=True, help="tiny-llama with attention_mask, position_ids and past/present keys and values.")
@_debug_option
def sample(
    name: str, output: Path, idiom: str, layers: int, hidden: int, heads: int, vocab: int, seed: int,
    kv_heads: int | None, kv_cache: bool,
) -> None:
    """Write a bundled sample model (built locally, random weights; no download)."""
    from passes.core.io import save_model
    from passes.samples import build_sample

    model = build_sample(name, idiom=idiom, layers=layers, hidden=hidden, heads=heads, vocab=vocab, seed=seed,  # type: ignore[arg-type]
                         kv_cache=kv_cache, kv_heads=kv_heads)
    save_model(model, output)
    cached = ", kv cache" if kv_cache else ""
    click.echo(f"wrote {output} ({name}, {idiom}, {layers} layers{cached}, {len(model.graph.node)} nodes)")


@cli.group(invoke_without_command=True)
@_json_option
@click.pass_context
@_debug_option
def targets(ctx: click.Context, as_json: bool) -> None:
    """List the bundled targets; `targets show NAME` describes one (NAME may be a .toml path)."""
    if ctx.invoked_subcommand is not None:
        return
    from passes.cli import _render
    from passes.targets import list_targets, load_target

    loaded = [load_target(name) for name in list_targets()]
    if as_json:
        _print_json({"targets": [target.to_dict() for target in loaded]})
    else:
        _render.target_table(loaded)


@targets.command(name="show")
@click.argument("name")
@_json_option
@_debug_option
def show_target(name: str, as_json: bool) -> None:
    """Describe target NAME ("sd8gen2", "sd8gen2:cpu" or path/to/mine.toml): figures, sources, capabilities."""
    from passes.cli import _render
    from passes.targets import load_target

    target = load_target(name)
    if as_json:
        _print_json(target.to_dict())
    else:
        _render.target_details(target)

