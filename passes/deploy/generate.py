"""`passes generate DIR`: greedy tokens from a generator build, how fast they came, and whether onnxruntime
running the same static-cache graph (DIR/model.onnx) produces the same tokens.

    report = generate_tokens("out/host", prompt_ids=[1, 2, 3], max_new_tokens=32)
    report = generate_tokens("out/sd8gen2", prompt_ids=[1, 2, 3], tracker=Tracker.parse("10.0.0.2:9190", "sd8gen2"))

Host builds run here; any build runs on a device registered with a TVM RPC tracker (`--tracker`), where
the step times are the device's own (the network's round trips are not counted).

The build writes its KV cache in place and takes its weights from DIR/params (a TVM tensor cache, read
through memory maps). Timing: prefill tokens/s over the whole prompt, decode tokens/s and per-token
P50/P90 latency over the decoded tokens; peak memory is this process's maximum resident set.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from passes.core.errors import PassesError

if TYPE_CHECKING:
    from passes.lowering._rpc import Tracker


class GenerateError(PassesError):
    """The folder is not a runnable generator, or the prompt does not fit it."""


@dataclass
class GenerateReport:
    folder: str
    prompt_tokens: list[int]
    tokens: list[int]
    text: str | None
    build: dict[str, Any]
    reference: dict[str, Any] | None  # onnxruntime on model.onnx: its tokens, speed and whether they match
    threads: int | None  # TVM's threads here; None for a device run (its runtime picks them)
    ran_on: str = "this machine"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_prompt_ids(text: str) -> list[int]:
    """`--prompt-ids 1,2,3` as token ids."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise GenerateError(f"--prompt-ids takes comma-separated integers, got {text!r}") from None


def generate_tokens(folder: str | os.PathLike[str], *, prompt_ids: Sequence[int] | None = None, prompt: str | None = None,
                    tokenizer: str | os.PathLike[str] | None = None, max_new_tokens: int = 32,
                    compare: bool = True, tracker: Tracker | None = None, session_timeout_s: float = 600.0,
                    on_stage: Callable[[str], None] = lambda _: None) -> GenerateReport:
    """Run the generator in `folder` (`passes run` on a KV-cache export) greedily: a host build here, or
    any build on a device registered with a TVM RPC `tracker` (the library and weights are uploaded for
    the session; onnxruntime's reference still runs here)."""
    from passes.lowering import LoweringError
    from passes.lowering._build import host_threads
    from passes.lowering._generate import GeneratorSpec, HostGenerator, OrtGenerator, RemoteGenerator
    from passes.lowering._rpc import TrackerError

    folder = Path(folder)
    codec = None
    if prompt is not None:
        if tokenizer is None:
            raise GenerateError("--prompt needs --tokenizer DIR (a tokenizer.json or the folder holding it)")
        from passes.numerics.perplexity import load_tokenizer

        codec = load_tokenizer(tokenizer)
        prompt_ids = codec.encode(prompt).ids
    if not prompt_ids:
        raise GenerateError("give --prompt-ids 1,2,3 or --prompt TEXT --tokenizer DIR (a non-empty prompt)")
    if max_new_tokens < 1:
        raise GenerateError("--max-new-tokens must be at least 1")
    try:
        spec = GeneratorSpec.load(folder)
        if any(not 0 <= t < spec.vocab for t in prompt_ids):
            raise GenerateError(f"prompt token ids must lie in [0, {spec.vocab}) for this model")
        if tracker is None:
            generator = HostGenerator.from_folder(folder)
            ran_on = "this machine"
        else:
            generator = RemoteGenerator.connect(folder, tracker, session_timeout_s, on_stage)
            ran_on = f"TVM RPC tracker {tracker}, device {spec.device}"
        on_stage(f"generating {max_new_tokens} tokens" + (" on the device" if tracker is not None else ""))
        with contextlib.closing(generator):  # a device session ends here, before onnxruntime's run
            built = generator.generate(list(prompt_ids), max_new_tokens)
        reference = None
        if compare:
            on_stage("the same prompt through onnxruntime on model.onnx (the reference)")
            ort = OrtGenerator(folder / "model.onnx", spec, threads=host_threads())
            expected = ort.generate(list(prompt_ids), max_new_tokens)
            reference = {**expected.to_dict(), "tokens_equal": expected.tokens == built.tokens,
                         "first_difference": next((i for i, (a, b) in enumerate(zip(built.tokens, expected.tokens))
                                                   if a != b), None),
                         # a speed ratio only where both ran on this machine
                         "decode_speedup": (built.decode_tokens_per_s / expected.decode_tokens_per_s
                                            if expected.decode_tokens_per_s and tracker is None else None)}
    except (LoweringError, TrackerError) as err:
        raise GenerateError(str(err)) from err
    except (RuntimeError, OSError) as err:  # through RPC: the device, its server or the network failed
        if tracker is None:
            raise
        lines = str(err).strip().splitlines()
        raise GenerateError(f"the run through {tracker} failed: {lines[-1] if lines else type(err).__name__}") from err
    text = codec.decode(built.tokens) if codec is not None else None
    return GenerateReport(str(folder), list(prompt_ids), built.tokens, text, built.to_dict(), reference,
                          host_threads() if tracker is None else None, ran_on)
