"""What `passes run` prints for a generator build, and what `passes generate` prints."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from passes.cli._render import _bytes, console


def generator_lines(report: Any) -> None:
    gen = report.generator or {}
    weights = gen.get("weights", {})
    share = gen.get("code_share_of_weights")
    console.print(f"generator: prefill {gen['prefill_chunk']} tokens a call, decode 1; KV cache {gen['context']} slots "
                  f"x {gen['caches']} tensors {gen['cache_shape']}, {gen['cache_writes_in_place']} writes in place")
    console.print(f"weights: {weights.get('tensors', 0)} tensors, {_bytes(weights.get('bytes', 0))} in params/ "
                  f"(stored once); model.tar {_bytes(gen['code_bytes'])}"
                  + (f" = {share:.1%} of the weights" if share is not None else ""))
    check = report.host_check
    if check is not None:
        if check["criterion"] == "allclose":
            console.print(f"host prefill + {check['decode_steps']} decode steps vs the exact reference: [green]equal"
                          f"[/green] (max abs error {check['max_abs_error']:.3g}; {check['rule']})")
        else:
            console.print(f"host prefill + {check['decode_steps']} decode steps vs the exact reference: [green]as "
                          f"accurate[/green] against fp32 (logits {check['build_db']:.1f} dB vs "
                          f"{check['reference_db']:.1f} dB; an ulp of float rounding flipped quantized codes)")


def generate_report(report: Any) -> None:
    """`passes generate`: the tokens (and text), speed, and the comparison with onnxruntime."""
    build, reference = report.build, report.reference
    console.print(f"prompt: {len(report.prompt_tokens)} tokens; generated {len(report.tokens)}: {report.tokens}")
    if report.text is not None:
        console.print(f"text: {report.text!r}")
    where = (f"this machine, {report.threads} threads" if report.threads is not None
             else f"{report.ran_on}; device time per step, RPC round trips not counted")
    table = Table(title=f"speed ({where})", title_justify="left")
    for column in ("", "prefill tok/s", "decode tok/s", "decode P50 ms", "decode P90 ms"):
        table.add_column(column, justify="right" if column else "left")
    peer = "onnxruntime" if report.threads is not None else "onnxruntime (here)"
    rows = [("passes (TVM)", build)] + ([(peer, reference)] if reference else [])
    for name, data in rows:
        table.add_row(name, f"{data['prefill_tokens_per_s']:.1f}", f"{data['decode_tokens_per_s']:.1f}",
                      f"{data['decode_latency_ms']['p50']:.2f}", f"{data['decode_latency_ms']['p90']:.2f}")
    console.print(table)
    if build["peak_rss_mb"] is not None:
        console.print(f"peak memory: {build['peak_rss_mb']:.0f} MB")
    if reference is not None:
        if reference["tokens_equal"]:
            console.print("tokens: [green]equal[/green] to onnxruntime's on the same graph")
        else:
            console.print(f"tokens: [red]differ[/red] from onnxruntime's from token {reference['first_difference']}: "
                          f"{reference['tokens']}")
