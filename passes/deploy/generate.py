"""`passes generate DIR`: greedy tokens from a generator build on this machine, how fast they came, and
whether onnxruntime running the same static-cache graph (DIR/model.onnx) produces the same tokens.

    report = generate_tokens("out/host", prompt_ids=[1, 2, 3], max_new_tokens=32)

The build writes its KV cache in place and takes its weights from DIR/params (a TVM tensor cache, read
through memory maps). Timing: prefill tokens/s over the whole prompt, decode tokens/s and per-token
P50/P90 latency over the decoded tokens; peak memory is this process's maximum resident set.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from passes.core.errors import PassesError


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
    threads: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def generate_tokens(folder: str | os.PathLike[str], *, prompt_ids: Sequence[int] | None = None, prompt: str | None = None,
                    tokenizer: str | os.PathLike[str] | None = None, max_new_tokens: int = 32,
                    compare: bool = True) -> GenerateReport:
    """Run the generator in `folder` (a host build of `passes run` on a KV-cache export) greedily."""
    from passes.lowering import LoweringError
    from passes.lowering._build import host_threads
    from passes.lowering._generate import GeneratorSpec, HostGenerator, OrtGenerator

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
        built = HostGenerator.from_folder(folder).generate(list(prompt_ids), max_new_tokens)
        reference = None
        if compare:
            ort = OrtGenerator(folder / "model.onnx", spec, threads=host_threads())
            expected = ort.generate(list(prompt_ids), max_new_tokens)
            reference = {**expected.to_dict(), "tokens_equal": expected.tokens == built.tokens,
                         "first_difference": next((i for i, (a, b) in enumerate(zip(built.tokens, expected.tokens))
                                                   if a != b), None),
                         "decode_speedup": (built.decode_tokens_per_s / expected.decode_tokens_per_s
                                            if expected.decode_tokens_per_s else None)}
    except LoweringError as err:
        raise GenerateError(str(err)) from err
    text = codec.decode(built.tokens) if codec is not None else None
    return GenerateReport(str(folder), list(prompt_ids), built.tokens, text, built.to_dict(), reference, host_threads())
