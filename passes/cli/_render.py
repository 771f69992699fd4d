"""Rich tables for the CLI. Only the CLI imports this; the library returns data and prints nothing."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from passes.infra._pass import Pass
from passes.infra.manager import PipelineReport
from passes.deploy.summary import ModelSummary
from passes.numerics.verify import Comparison

if TYPE_CHECKING:
    from passes.deploy.run import RunReport
    from passes.targets import TargetDescription

console = Console(highlight=False)


def _bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1024
    return f"{count:.2f} TiB"


def _stats_text(stats: Mapping[str, object]) -> str:
    return ", ".join(f"{k}={v}" for k, v in stats.items() if v not in (0, False, "", None))


def pipeline_report(report: PipelineReport, output: Path, *, explain: bool = False) -> None:
    table = Table(title=f"pipeline: {report.pipeline}", title_justify="left")
    for column, justify in (("#", "right"), ("pass", "left"), ("round", "right"), ("ms", "right"),
                            ("nodes", "right"), ("changes", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    idle = 0
    lifted = report.constants_lifted_at_import
    if lifted:  # fold-constants' lifting, done while the model was imported
        table.add_row("", "import", "", "", f"{report.nodes_before} -> {report.nodes_before - lifted}",
                      f"constant_nodes_lifted={lifted}")
    for record in report.passes:
        if not record.modified:
            idle += 1
            continue
        error = f" (max abs err {record.max_abs_error:.2g})" if record.max_abs_error is not None else ""
        table.add_row(
            str(record.index), record.name, str(record.round or ""), f"{record.wall_s * 1e3:.1f}",
            f"{record.nodes_before} -> {record.nodes_after}", _stats_text(record.stats) + error,
        )
    console.print(table)
    if idle:
        console.print(f"[dim]{idle} pass application(s) changed nothing[/dim]")
    _op_changes(report)
    if explain:
        _refusals(report)
    if report.verification is not None:
        check = report.verification
        state = "[green]equal[/green]" if check["ok"] else "[red]DIFFERENT[/red]"
        worst = max((o["max_abs_error"] for o in check["outputs"]), default=0.0)
        console.print(
            f"verified against the input: {state} (max abs error {worst:.3g}, "
            f"rtol={check['rtol']:g}, atol={check['atol']:g}, seed {check['seed']})"
        )
    console.print(
        f"{report.nodes_before} -> {report.nodes_after} nodes in {report.wall_s:.2f} s; wrote [bold]{output}[/bold]"
    )


def _op_changes(report: PipelineReport) -> None:
    ops = sorted(set(report.ops_before) | set(report.ops_after))
    changed = [(op, report.ops_before.get(op, 0), report.ops_after.get(op, 0)) for op in ops]
    changed = [row for row in changed if row[1] != row[2]]
    if not changed:
        return
    table = Table(title="op count changes", title_justify="left")
    table.add_column("op")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for op, before, after in sorted(changed, key=lambda r: r[2] - r[1]):
        table.add_row(op, str(before), str(after))
    console.print(table)


def _refusals(report: PipelineReport) -> None:
    seen: set[tuple[str, str, str]] = set()
    table = Table(title="rewrites not applied", title_justify="left")
    for column in ("pass", "node", "reason"):
        table.add_column(column)
    for record in report.passes:
        for refusal in record.refusals:
            key = (record.name, refusal["node"], refusal["reason"])
            if key not in seen:
                seen.add(key)
                table.add_row(*key)
    console.print(table if seen else "[dim]no rewrite was refused[/dim]")


def pass_list(passes: Mapping[str, type[Pass]], pipelines: Mapping[str, str]) -> None:
    table = Table(title="passes", title_justify="left", show_lines=False)
    table.add_column("name", style="bold")
    table.add_column("what it does")
    table.add_column("options")
    for name, cls in passes.items():
        options = "\n".join(f"{o.name}: {o.type} = {o.default}" + (f"  ({o.help})" if o.help else "")
                            for o in cls.options())
        table.add_row(name, cls.summary(), options or "-")
    console.print(table)
    named = Table(title="named pipelines", title_justify="left")
    named.add_column("name", style="bold")
    named.add_column("expands to")
    for name, spec in pipelines.items():
        named.add_row(name, spec)
    console.print(named)


def comparison(result: Comparison, reference: Path, candidate: Path) -> None:
    table = Table(title=f"{candidate} vs {reference} (seed {result.seed}, rtol={result.rtol:g}, atol={result.atol:g})",
                  title_justify="left")
    for column, justify in (("output", "left"), ("shape", "left"), ("dtype", "left"),
                            ("max abs err", "right"), ("max rel err", "right"), ("", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for out in result.outputs:
        verdict = "[green]ok[/green]" if out.ok else f"[red]MISMATCH[/red] {out.problem}"
        table.add_row(out.name, "x".join(map(str, out.shape)) or "scalar", out.dtype,
                      f"{out.max_abs_error:.3g}", f"{out.max_rel_error:.3g}", verdict)
    console.print(table)
    console.print("[green]equivalent[/green]" if result.ok else "[red]models differ beyond tolerance[/red]")


def model_summary(summary: ModelSummary) -> None:
    facts = Table(title=summary.path or "model", title_justify="left", show_header=False)
    facts.add_column("fact", style="bold")
    facts.add_column("value")
    facts.add_row("opsets", ", ".join(f"{d} {v}" for d, v in summary.opsets.items()))
    facts.add_row("IR version", str(summary.ir_version))
    facts.add_row("producer", summary.producer or "-")
    facts.add_row("nodes", str(summary.nodes))
    facts.add_row("parameters", f"{summary.parameters:,}")
    for precision, count in summary.weight_bytes.items():
        facts.add_row(f"weights at {precision}", _bytes(count))
    facts.add_row("stored constants", _bytes(summary.stored_weight_bytes))
    facts.add_row("external data", ", ".join(summary.external_data_files) or "none")
    for tensor in summary.inputs:
        facts.add_row(f"input {tensor.name}", f"{tensor.dtype}[{', '.join(map(str, tensor.shape))}]")
    for tensor in summary.outputs:
        facts.add_row(f"output {tensor.name}", f"{tensor.dtype}[{', '.join(map(str, tensor.shape))}]")
    dynamic = ", ".join(f"{d['input']}[{d['axis']}]={d['dim']}" for d in summary.dynamic_dims)
    facts.add_row("dynamic dims", dynamic or "none")
    console.print(facts)
    ops = Table(title="ops", title_justify="left")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, count in summary.ops.items():
        ops.add_row(op, str(count))
    console.print(ops)


# -- targets ---------------------------------------------------------------------------------------

def _figure(value: float | None, unit: str = "") -> str:
    return "[dim]?[/dim]" if value is None else f"{value:g}{unit}"


def target_table(targets: Sequence[TargetDescription]) -> None:
    table = Table(title="targets", title_justify="left")
    table.add_column("name", style="bold", no_wrap=True)
    table.add_column("runs on")
    table.add_column("SoC")
    for column in ("GB/s", "fp16 TFLOPS", "int8 TOPS"):
        table.add_column(column, justify="right")
    table.add_column("quant", no_wrap=True)
    for target in targets:
        if target.device == "gpu":
            runs_on = f"{target.identity.gpu or 'GPU'} ({target.backend})"
        else:
            cores = f", {target.cpu.cores} cores" if target.cpu.cores else ""
            runs_on = f"{target.cpu.arch} CPU{cores} ({target.backend})"
        table.add_row(
            escape(target.name), escape(runs_on), escape(target.identity.marketing_name),
            _figure(target.memory.bandwidth_gbps),
            _figure(target.compute.fp16_tflops), _figure(target.compute.int8_tops), target.capabilities.quantization,
        )
    console.print(table)
    console.print("[dim]peak figures, some approximate or assumed: `passes targets show NAME` gives sources[/dim]")


def target_details(target: TargetDescription) -> None:
    facts = Table(title=f"target {target.name}", title_justify="left", show_header=False)
    facts.add_column("fact", style="bold")
    facts.add_column("value")
    identity = target.identity
    for fact, value in (
        ("file", str(target.source_path)), ("device", f"{target.device} ({target.backend})"),
        ("SoC", f"{identity.vendor} {identity.marketing_name} ({identity.soc})"), ("GPU", identity.gpu or "-"),
        ("CPU cores", identity.cpu_cores), ("TVM target", json.dumps(target.tvm.target)),
        ("TVM host", json.dumps(target.tvm.host) if target.tvm.host is not None else "-"),
        ("pipeline", target.pipeline),
        ("defaults", f"batch {target.defaults.batch}, sequence {target.defaults.sequence}"),
    ):
        facts.add_row(fact, escape(value))
    console.print(facts)
    for group in ("memory", "gpu", "cpu"):
        figures = getattr(target, group)
        if figures is None:
            continue
        table = Table(title=group, title_justify="left", show_header=False)
        table.add_column("figure", style="bold")
        table.add_column("value", overflow="fold")
        for key, value in figures.model_dump(mode="json").items():
            if key != "source":
                unknown = "-" if key == "metal_family" else "[dim]unknown[/dim]"
                table.add_row(key, unknown if value is None else _target_value(value))
        table.add_row("source", f"[dim]{escape(figures.source)}[/dim]")
        console.print(table)
    _target_capabilities_and_schedule(target)


def _target_value(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return escape(", ".join(map(str, value))) or "-"
    return escape(str(value))


def _target_capabilities_and_schedule(target: TargetDescription) -> None:
    caps = Table(title="capabilities", title_justify="left", show_header=False)
    caps.add_column("capability", style="bold")
    caps.add_column("value")
    for key, value in target.capabilities.model_dump(mode="json").items():
        caps.add_row(key, _target_value(value))
    console.print(caps)
    schedule = Table(title="INT8 kernel schedules (starting points)", title_justify="left")
    for column in ("kernel", "tile m x n x k", "vector width", "work group"):
        schedule.add_column(column)
    for kernel in ("gemm", "gemv"):
        tiles = getattr(target.schedule, kernel)
        group = "-" if tiles.work_group_x is None else f"{tiles.work_group_x} x {tiles.work_group_y}"
        schedule.add_row(kernel, f"{tiles.tile_m} x {tiles.tile_n} x {tiles.tile_k}", str(tiles.vector_width), group)
    console.print(schedule)
    limit = target.schedule.max_work_group
    console.print(f"[dim]{'max work group ' + str(limit) + '; ' if limit else ''}{escape(target.schedule.source)}[/dim]")


# -- passes run -------------------------------------------------------------------------------------
def _rate(value: float | None) -> str:
    if value is None:
        return "[dim]unknown[/dim]"
    return f"{value:,.0f} tok/s" if value >= 10 else f"{value:.2f} tok/s"


def quantization_details(q: dict[str, Any]) -> None:
    """Smoothing, the mixed-precision fallback, perplexity and the loud warnings of a quantization summary."""
    if q.get("smoothing"):
        console.print(f"smoothed {q['smoothing']['activations']} activations (SmoothQuant alpha {q['smoothing']['alpha']:g})")
    mixed = q.get("mixed_precision")
    if mixed:
        fallback = mixed["fallback_layers"]
        console.print(f"mixed precision: {mixed['w8a8_layers']} layers W8A8, {len(fallback)} kept "
                      f"{fallback[0]['kept'] if fallback else 'W8A16'} (own SQNR < {mixed['min_layer_sqnr_db']:g} dB)")
        for layer in fallback[:8]:
            console.print(f"  {layer['layer']}: {_db(layer['sqnr_db'])}")
        if len(fallback) > 8:
            console.print(f"  ... and {len(fallback) - 8} more (report.json lists them all)")
    ppl = q.get("perplexity")
    if ppl:
        console.print(f"perplexity on {ppl['windows']} windows x {ppl['window']} tokens: float {ppl['float']:.3f}, "
                      f"quantized {ppl['quantized']:.3f} ({ppl['increase_pct']:+.2f} %)")
    for warning in q.get("warnings", []):
        console.print(f"[bold red]warning: {warning}[/bold red]")


def accuracy_report(change: dict[str, Any], report: Any) -> None:
    """`passes accuracy`: perplexity, output SQNR and the ten worst layers."""
    console.print(f"perplexity on {change['windows']} windows x {change['window']} tokens: float {change['float']:.3f}, "
                  f"quantized {change['quantized']:.3f} ({change['increase_pct']:+.2f} %)")
    for output in report.outputs:
        console.print(f"output {escape(output.name)}: SQNR {_db(output.sqnr_db)}")
    worst = sorted((layer for layer in report.layers if layer.quantized), key=lambda layer: layer.sqnr_db)[:10]
    if worst:
        table = Table(title="least accurate quantized layers (end to end, first 2 windows)", title_justify="left")
        table.add_column("layer")
        table.add_column("SQNR", justify="right")
        table.add_column("max abs error", justify="right")
        for layer in worst:
            table.add_row(escape(layer.name), _db(layer.sqnr_db), f"{layer.max_abs_error:.3g}")
        console.print(table)


def _db(value: float | str) -> str:
    return f"{value:.1f} dB" if isinstance(value, (int, float)) else f"{value} dB"


def run_report(report: RunReport) -> None:
    console.print(f"[bold]{report.target}[/bold]: {report.model} -> {report.output_dir}/")
    if report.bound_dims:
        bound = ", ".join(f"{b.input}[{b.axis}] {b.dim}={b.value} ({b.source})" for b in report.bound_dims)
        console.print(f"dynamic dims bound: {bound}")
    pipeline = report.pipeline
    console.print(
        f"pipeline {report.pipeline_spec} ({len(pipeline['passes'])} pass runs): {pipeline['nodes_before']} -> "
        f"{pipeline['nodes_after']} nodes in {pipeline['wall_s']:.2f} s; built in {report.build_seconds:.1f} s"
    )
    _run_ops_table(report)
    if report.quantization is not None:
        q = report.quantization
        console.print(f"quantized {q['matmuls_quantized']} matmuls {q['scheme']} ({q['activations']} activations; "
                      f"{q['chosen_by']}; calibration: "
                      f"{q['calibration']}): output SQNR {q['output_sqnr_db']:.1f} dB on {q['accuracy_inputs']}")
        quantization_details(q)
    roof = report.roofline
    table = Table(title="roofline (upper bounds from the target's stated figures)", title_justify="left")
    for column in ("weights", "bytes read per token", "decode bound"):
        table.add_column(column, justify="right" if column != "weights" else "left")
    for precision, size in roof["weight_bytes_per_token"].items():
        table.add_row(precision, _bytes(size), _rate(roof["decode_tokens_per_s"][precision]))
    console.print(table)
    prefill = _rate(roof["prefill_tokens_per_s"])
    console.print(f"prefill bound ({roof['prefill_peak'] or 'no'} peak): {prefill}; "
                  f"matmul ops per token: {roof['matmul_ops_per_token'] or 0:,.0f}")
    for row in report.missing_ops:
        console.print(f"target lacks {row['op']} ({row['capability']}): {row['status']}")
    for family, d in report.dispatched.items():
        console.print(f"{d['matmuls']} int8 matmuls -> {len(d['kernels'])} {family} kernels")
    if report.tuning is not None:
        console.print(f"tuned schedules from {report.tuning['session']}: {report.tuning['kernels_tuned']} of "
                      f"{report.tuning['kernels']} kernels")
    if report.host_check is not None and report.generator is None:  # a generator's: `_render_generate`
        check = report.host_check
        worst = max((o["max_abs_error"] for o in check["outputs"]), default=0.0)
        if check.get("criterion") == "allclose":
            console.print(f"host build vs the exact reference: [green]equal[/green] (max abs error {worst:.3g}, "
                          f"rtol={check['rtol']:g}, atol={check['atol']:g} x max |output|; "
                          f"{check.get('threads', '?')} threads)")
        else:
            figures = ", ".join(f"{name} {v['build_db']:.1f} dB vs {v['reference_db']:.1f} dB"
                                for name, v in check["sqnr"].items())
            console.print(f"host build vs the exact reference: [green]as accurate[/green] against fp32 ({figures}; "
                          f"an ulp of float rounding flipped quantized codes, max abs error {worst:.3g})")
    for note in [*report.notes, *roof["notes"]]:
        console.print(f"[dim]note: {note}[/dim]")
    console.print(f"wrote {len(report.artifacts)} files: {', '.join(sorted(report.artifacts)[:6])}"
                  + (" ..." if len(report.artifacts) > 6 else ""))


def _run_ops_table(report: RunReport) -> None:
    ops = sorted(set(report.ops_before) | set(report.ops_after),
                 key=lambda op: -max(report.ops_before.get(op, 0), report.ops_after.get(op, 0)))
    table = Table(title="ops before -> after", title_justify="left")
    table.add_column("op")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for op in ops[:16]:
        table.add_row(op, str(report.ops_before.get(op, 0)), str(report.ops_after.get(op, 0)))
    console.print(table)

