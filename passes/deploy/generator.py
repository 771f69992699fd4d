"""`passes run` on a decoder export with a KV cache: build a generator, not one forward pass.

    kv graph --static-kv-cache{capacity}--> fixed-capacity cache written at cache_position
             --target pipeline (dims dynamic), quantization (once: one weight set)-->  model.onnx
             --freeze seq = prefill chunk / 1, target pipeline--> prefill, decode graphs
             --lower_generator--> one module: prefill(), decode(), caches written in place,
                                  weights lifted out of the code
    artifacts: model.tar (+ model.so on the host): code only; params/: the weights once (TVM tensor
               cache); generator.json: how to drive it; model.onnx: the static-cache graph (what
               onnxruntime runs as the reference); manifest.json, report.json

On the host the build is checked against onnxruntime running model.onnx with the same cache: a seeded
prompt prefilled in chunks and a few decode steps, logits within a tolerance scaled to their magnitude.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from passes.core import ir
from passes.core.errors import PassesError, VerificationError
from passes.core.io import save_model
from passes.deploy.roofline import estimate
from passes.frontend.prepare import BoundDim, QuantizeSettings, _quantize
from passes.numerics.verify import filled_model
from passes.infra.manager import Instrument, PassManager
from passes.infra.pipeline import parse_pipeline
from passes.lowering._generate import OrtGenerator
from passes.transforms.static_kv_cache import CACHE_POSITION, StaticKvCache, cache_pairs

#: host check: logits of the build and onnxruntime agree within RTOL x max |reference logits| (+ ATOL)
CHECK_RTOL, CHECK_ATOL = 1e-3, 1e-4
#: decode steps the host check runs after its prefill
CHECK_DECODE_STEPS = 3
#: run on each phase once its shapes are frozen: attention reads grouped K/V heads in the cache itself
PHASE_PASSES = "group-query-attention,cleanup"
#: the TVM device a back end's functions run on (`generator.json`'s "device", for runs through RPC)
RPC_DEVICES = {"llvm": "cpu", "opencl": "cl", "metal": "metal"}


class GeneratorError(PassesError):
    """The KV-cache export cannot be made a generator (see the message)."""


def is_kv_export(model: onnx.ModelProto) -> bool:
    """True for a decoder export whose cache grows by Concat (past_key_values in, present out)."""
    return bool(cache_pairs(ir.import_graph(model, infer_shapes=False)))


def prepare_generator(load: Callable[[], onnx.ModelProto], target: Any, *, context: int | None,
                      prefill_chunk: int | None, pipeline: str | None, settings: QuantizeSettings, check_here: bool,
                      instruments: tuple[Instrument, ...] = (),
                      on_stage: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """The static-cache graph (quantized as the target prefers), its frozen prefill and decode graphs, the
    generator's description and, when the build will run here (`check_here`), the reference it is checked
    against. `load` gives the export; no more than one float copy of the weights is alive at a time (a
    1.1B-parameter model is 4.4 GB of them)."""
    capacity = context or target.defaults.context
    chunk = min(prefill_chunk or target.defaults.prefill_chunk, capacity)
    on_stage(f"making the KV cache static ({capacity} slots) and rewriting the graph")
    elements = [StaticKvCache(capacity=capacity), *parse_pipeline(pipeline or target.pipeline).elements]
    # the weights live as numpy arrays beside hollow models (`PassManager.run(hollow=True)`) until the
    # phase graphs are made: a protobuf copy of 4 GB of float weights is never made
    canonical = PassManager(elements, instruments=instruments).run(load(), hollow=True)
    record = next(r for r in canonical.report.passes if r.name == StaticKvCache.name)
    if not record.modified:
        reason = record.refusals[0]["reason"] if record.refusals else "no Concat(past, new) cache found"
        raise GeneratorError(f"cannot build a generator: {reason}")
    model, weights, pipeline_report = canonical.model, canonical.weights, canonical.report
    del canonical
    gc.collect()
    shapes = {phase: phase_shapes(model, 1, size, capacity) for phase, size in (("prefill", chunk), ("decode", 1))}
    if settings.scheme != "none":
        on_stage("quantizing (smoothing, calibration, SQNR)")
    quantized, quantization, quantized_weights = _quantize(model, target, settings, shapes["prefill"], weights)
    float_model = None
    if quantization is not None and check_here and quantizes_activations(quantized):
        float_model = (model, weights)
    del model, weights
    gc.collect()  # the quantizer's sessions and graphs hold copies of the float weights in cycles
    phases = {}
    for phase, bound in shapes.items():
        on_stage(f"freezing the {phase} graph")
        phases[phase] = PassManager(f"{target.pipeline},{PHASE_PASSES}", input_shapes=bound).run(
            quantized, weights=quantized_weights).model
    spec = generator_spec(phases, capacity, chunk, device=RPC_DEVICES[target.backend])
    plan = None
    if check_here:
        on_stage("running the reference: onnxruntime, prefill and decode")
        plan = reference_plan(spec, (quantized, quantized_weights), float_model)
    del float_model
    quantized = filled_model(quantized, quantized_weights)  # model.onnx, the manifest and the summary read it
    del quantized_weights
    gc.collect()
    bound_dims = [BoundDim("past_key_values", 2, "context", capacity, "--context" if context else "target defaults.context"),
                  BoundDim("input_ids", 1, "seq", chunk, "--prefill-chunk" if prefill_chunk else "target defaults.prefill_chunk")]
    return {"model": quantized, "phases": phases, "shapes": shapes, "capacity": capacity, "chunk": chunk,
            "quantization": quantization, "report": pipeline_report, "bound": bound_dims,
            "spec": spec, "plan": plan}


def phase_shapes(model: onnx.ModelProto, batch: int, seq: int, capacity: int) -> dict[str, tuple[int, ...]]:
    """Static shapes of every input of the static-cache graph for `seq` new tokens."""
    shapes: dict[str, tuple[int, ...]] = {}
    initializers = {t.name for t in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
        if value.name == CACHE_POSITION:
            shapes[value.name] = (seq,)
        elif value.name in ("input_ids", "position_ids"):
            shapes[value.name] = (batch, seq)
        elif value.name == "attention_mask":
            shapes[value.name] = (batch, capacity)
        elif len(dims) == 4 and dims[2] == capacity:
            shapes[value.name] = (batch, *dims[1:])  # type: ignore[arg-type]
        elif None in dims:
            raise GeneratorError(f"input {value.name!r} has a dynamic dim a generator cannot bind "
                                 f"({['?' if d is None else d for d in dims]})")
        else:
            shapes[value.name] = tuple(dims)  # type: ignore[arg-type]
    return shapes


def build_generator(prepared: dict[str, Any], target: Any, staging: Path, report: Any, tuning: Any = None,
                    on_stage: Callable[[str], None] = lambda _: None) -> None:
    """Lower, build and write the generator's artifacts into `staging`; fill `report`. The phase graphs
    are handed to the lowering, which drops each once TVM has imported it: `prepared["phases"]` is gone
    afterwards."""
    from passes.lowering import build, write_artifacts
    from passes.lowering._build import host_threads
    from passes.lowering._lower import lower_generator

    started = time.perf_counter()
    on_stage(f"lowering prefill and decode through TVM for {target.name}")
    lowered = lower_generator(prepared.pop("phases"), target, tuning=tuning.memory if tuning is not None else None,
                              release=True)
    on_stage(f"building {len(lowered.reference_kernels)} kernels")
    built = build(lowered, target)
    report.build_seconds = time.perf_counter() - started
    report.dispatched = {family: d.to_dict() for family, d in lowered.dispatched.items()}
    on_stage("writing artifacts")
    written = {name: path.relative_to(staging) for name, path in write_artifacts(built, staging).items()}
    save_model(prepared["model"], staging / "model.onnx")
    written["model.onnx"] = Path("model.onnx")
    for data in staging.glob("model.onnx.*.data"):
        written[data.name] = Path(data.name)
    spec = prepared["spec"]
    for phase, (inputs, outputs) in lowered.entries.items():
        if [t.name for t in inputs] != spec.inputs[phase] or [t.name for t in outputs] != spec.outputs[phase]:
            raise GeneratorError(f"the lowered {phase} function's signature differs from its graph's")
    written["generator.json"] = spec.save(staging).relative_to(staging)
    weight_bytes = sum(int(value.nbytes) for value in lowered.weights.values())
    code_bytes = (staging / "model.tar").stat().st_size
    report.generator = {
        "phases": {phase: {"tokens": prepared["shapes"][phase]["input_ids"][1]} for phase in lowered.entries},
        "context": prepared["capacity"], "prefill_chunk": prepared["chunk"],
        "caches": len(spec.caches), "cache_shape": spec.cache_shape, "cache_writes_in_place": lowered.cache_writes_in_place,
        "weights": {"tensors": len(lowered.weights), "bytes": weight_bytes, "file": "params/tensor-cache.json"},
        "code_bytes": code_bytes, "code_share_of_weights": code_bytes / weight_bytes if weight_bytes else None,
    }
    if built.runs_here:
        on_stage("running prefill and decode against onnxruntime")
        report.host_check = check_generator(built, lowered.weights, spec, prepared["plan"])
        report.host_check["threads"] = host_threads()
    else:
        report.notes.append(f"{target.name} is not this machine: the build is not run here")
        report.notes.append("linking a loadable library needs the target's toolchain (Android NDK / Xcode): "
                            "model.tar holds the objects; params/ holds the weights")
    report.artifacts = {name: str(rel) for name, rel in sorted(written.items())}


def generator_spec(phases: Mapping[str, onnx.ModelProto], capacity: int, chunk: int, device: str = "cpu") -> Any:
    """The generator's description, from the frozen phase graphs: inputs and outputs by ONNX name, caches
    paired input -> output by the ScatterElements writing them."""
    from passes.lowering._generate import GeneratorSpec

    graph = phases["decode"].graph
    inputs = {v.name: v for v in graph.input}
    outputs = {v.name: v for v in graph.output}
    pairs = [(node.input[0], node.output[0]) for node in graph.node
             if node.op_type == "ScatterElements" and node.input[0] in inputs and node.output[0] in outputs]
    if not pairs or "logits" not in outputs:
        raise GeneratorError("the decode graph lost its cache writes or its logits output")
    cache = inputs[pairs[0][0]]
    dims = [d.dim_value for d in cache.type.tensor_type.shape.dim]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(cache.type.tensor_type.elem_type)
    vocab = outputs["logits"].type.tensor_type.shape.dim[-1].dim_value

    def names(values: Any, model: onnx.ModelProto) -> list[str]:
        initializers = {t.name for t in model.graph.initializer}
        return [v.name for v in values if v.name not in initializers]

    return GeneratorSpec(capacity, chunk, [p[0] for p in pairs], [p[1] for p in pairs], dims, str(dtype),
                         {phase: names(m.graph.input, m) for phase, m in phases.items()},
                         {phase: [v.name for v in m.graph.output] for phase, m in phases.items()}, int(vocab),
                         device=device)


def quantizes_activations(model: onnx.ModelProto) -> bool:
    """Whether the quantized graph quantizes activations (W8A8), so fp32 logits judge the host check."""
    from passes.deploy.host_check import ACTIVATION_QUANTIZERS

    return any(node.op_type in ACTIVATION_QUANTIZERS for node in model.graph.node)


def reference_plan(spec: Any, model: tuple[onnx.ModelProto, Mapping[str, np.ndarray] | None],
                   float_model: tuple[onnx.ModelProto, Mapping[str, np.ndarray] | None] | None) -> dict[str, Any]:
    """What the host check replays: a seeded prompt (a chunk and a bit) prefilled in chunks, then
    `CHECK_DECODE_STEPS` greedy tokens, run by the exact reference (onnxruntime on `model`, integer
    matmuls exact); the logits of each step, and fp32's on the same tokens when `float_model` is given
    (the caller gives it where activations are quantized: `quantizes_activations`). Each model comes with the values of its hollow initializers (`PassManager.run(hollow=True)`; None
    when it is whole). The two run one after the other, so only one session holds weights at a time."""
    reference = OrtGenerator(model[0], spec, exact=True, weights=model[1])
    prompt_length = min(spec.prefill_chunk + 3, spec.capacity - CHECK_DECODE_STEPS)
    rng = np.random.default_rng(0)
    steps: list[tuple[str, list[int], int]] = []
    logits: dict[str, list[np.ndarray]] = {"reference": []}
    position, token = 0, 0
    while position < prompt_length + CHECK_DECODE_STEPS:
        phase = "prefill" if position < prompt_length else "decode"
        size = min(spec.prefill_chunk, prompt_length - position) if phase == "prefill" else 1
        piece = [int(t) for t in rng.integers(0, spec.vocab, size)] if phase == "prefill" else [token]
        steps.append((phase, piece, position))
        logits["reference"].append(reference.step(phase, piece, position))
        token = int(np.argmax(logits["reference"][-1][-1]))
        position += size
    del reference
    if float_model is not None:
        fp32 = OrtGenerator(float_model[0], spec, exact=True, weights=float_model[1])
        logits["fp32"] = [fp32.step(phase, piece, position) for phase, piece, position in steps]
    return {"steps": steps, "prompt_tokens": prompt_length,
            **{name: np.concatenate(values) for name, values in logits.items()}}


def check_generator(built: Any, weights: Mapping[str, np.ndarray], spec: Any, plan: Mapping[str, Any]) -> dict[str, Any]:
    """Replay `plan` (`reference_plan`) on the host build. Float logits agree within a tolerance scaled to
    their magnitude; where activations are quantized (an ulp of float rounding can flip a code), the
    build's SQNR against fp32 may fall at most `QUANTIZED_MARGIN_DB` below the reference's.
    `VerificationError` when neither holds."""
    from passes.deploy.host_check import QUANTIZED_MARGIN_DB
    from passes.lowering._generate import HostGenerator
    from passes.numerics.accuracy import sqnr_db

    host = HostGenerator(built.executable, [_device_tensor(w) for w in weights.values()], spec)
    got = np.concatenate([host.step(phase, piece, position) for phase, piece, position in plan["steps"]])
    expected = plan["reference"]
    worst, scale = float(np.abs(got - expected).max()), float(np.abs(expected).max())
    tolerance = CHECK_RTOL * scale + CHECK_ATOL
    result: dict[str, Any] = {
        "passed": worst <= tolerance, "criterion": "allclose",
        "reference": "onnxruntime on model.onnx, integer ops exact (passes.numerics.exact)",
        "prompt_tokens": plan["prompt_tokens"], "decode_steps": CHECK_DECODE_STEPS, "max_abs_error": worst,
        "max_abs_reference": scale, "tolerance": tolerance,
        "rule": f"max |build - reference| <= {CHECK_RTOL:g} x max |reference| + {CHECK_ATOL:g}"}
    if not result["passed"] and "fp32" in plan:
        build_db, reference_db = sqnr_db(plan["fp32"], got), sqnr_db(plan["fp32"], expected)
        result.update(criterion="sqnr against fp32", build_db=build_db, reference_db=reference_db,
                      margin_db=QUANTIZED_MARGIN_DB, passed=build_db >= reference_db - QUANTIZED_MARGIN_DB,
                      rule=f"the build's logits SQNR against fp32 at most {QUANTIZED_MARGIN_DB:g} dB below the "
                           "reference's (a quantized code can flip on an ulp of float rounding)")
    if not result["passed"]:
        raise VerificationError(f"the host generator differs from the reference over prefill and decode: max abs "
                                f"error {worst:.3g} ({result['rule']})"
                                + (f"; SQNR vs fp32 {result['build_db']:.1f} dB, the reference's "
                                   f"{result['reference_db']:.1f} dB" if "build_db" in result else ""))
    return result


def _device_tensor(weight: np.ndarray) -> Any:
    """A TVM tensor of a lifted weight: its memory itself where it can be (a lifted weight is a view of a
    TVM tensor), else a copy."""
    import tvm

    try:
        return tvm.runtime.from_dlpack(weight)
    except (TypeError, ValueError, RuntimeError, BufferError):
        return tvm.runtime.tensor(np.ascontiguousarray(weight))


def generator_roofline(prepared: Mapping[str, Any], target: Any) -> dict[str, Any]:
    """Decode: weights + the whole KV cache read per token; prefill: peak ops / matmul ops per token."""
    spec = prepared["spec"]
    kv_bytes = len(spec.caches) * int(np.prod(spec.cache_shape)) * np.dtype(spec.cache_dtype).itemsize
    decode = estimate(prepared["phases"]["decode"], target, tokens=1, kv_cache_bytes=kv_bytes)
    prefill = estimate(prepared["phases"]["prefill"], target, tokens=prepared["chunk"])
    result = decode.to_dict()
    result["prefill_tokens_per_s"] = prefill.prefill_tokens_per_s
    result["matmul_ops_per_token"] = prefill.matmul_ops_per_token
    result["phases"] = {"decode": "weights + KV cache per token", "prefill": f"chunks of {prepared['chunk']} tokens"}
    return result
