"""Run a generator: prefill a prompt in chunks, then decode one token at a time against a fixed-capacity
KV cache, greedily.

    spec = GeneratorSpec.load(folder)                       # generator.json written by `passes run`
    tvm_gen = HostGenerator.from_folder(folder)             # model.so + params/ (host builds)
    ort_gen = OrtGenerator(folder / "model.onnx", spec)     # the same graph under onnxruntime
    result = tvm_gen.generate([1, 2, 3], max_new_tokens=32)

Both run the graph `static-kv-cache` made (inputs `input_ids`, `attention_mask`, `position_ids`,
`cache_position` and the caches; outputs `logits` and the updated caches), so the same prompt gives the
same cache contents step by step, and their greedy tokens can be compared one for one. The TVM build
writes the caches in place: the tensors passed in are the tensors returned, kept from step to step.
A prefill chunk shorter than the compiled chunk is padded; the padding's slots lie after every real
token, so no real token attends to them, and the next token overwrites them before anyone reads them.
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
import resource
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from passes.lowering._errors import LoweringError

#: the generator's description beside the build
SPEC_FILE = "generator.json"
#: TVM encodes a remote device's type as its type + (session + 1) x this
RPC_SESSION_MASK = 128


@dataclass(frozen=True)
class GeneratorSpec:
    """What a caller needs to drive the build: phases and their compiled chunk, cache names and shapes."""

    capacity: int
    prefill_chunk: int
    caches: list[str]  # cache input names, in the order the functions take them
    cache_outputs: list[str]
    cache_shape: list[int]
    cache_dtype: str
    inputs: dict[str, list[str]]  # phase -> input names in order (caches included, weights not)
    outputs: dict[str, list[str]]  # phase -> output names in order (logits and the updated caches)
    vocab: int
    logits: str = "logits"
    device: str = "cpu"  # where the functions run: "cpu", "cl" (OpenCL) or "metal" (TVM's device names)

    def save(self, folder: Path) -> Path:
        path = Path(folder) / SPEC_FILE
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, folder: Path) -> GeneratorSpec:
        path = Path(folder) / SPEC_FILE
        if not path.is_file():
            raise LoweringError(f"{folder}: no {SPEC_FILE}; build a KV-cache export with `passes run` first")
        return cls(**json.loads(path.read_text()))


@dataclass
class Generation:
    """Greedy tokens and how fast they came."""

    tokens: list[int]
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: list[float] = field(default_factory=list)  # one per decoded token
    peak_rss_mb: float | None = None  # this process's peak; None where the build ran elsewhere (RPC)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        total = sum(self.decode_seconds)
        return len(self.decode_seconds) / total if total else 0.0

    def latency_ms(self, percentile: float) -> float:
        return float(np.percentile(self.decode_seconds, percentile) * 1e3) if self.decode_seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "prompt_tokens": self.prompt_tokens,
                "prefill_tokens_per_s": self.prefill_tokens_per_s, "decode_tokens_per_s": self.decode_tokens_per_s,
                "decode_latency_ms": {"p50": self.latency_ms(50), "p90": self.latency_ms(90)},
                "peak_rss_mb": self.peak_rss_mb}


class Generator(abc.ABC):
    """Greedy generation over `step`, which runs one phase on a chunk of tokens at a start position."""

    def __init__(self, spec: GeneratorSpec) -> None:
        self.spec = spec

    @abc.abstractmethod
    def reset(self) -> None:
        """Empty the cache."""

    @abc.abstractmethod
    def step(self, phase: str, tokens: Sequence[int], start: int) -> np.ndarray:
        """Run `phase` on `tokens` at positions start..; the logits of the real tokens [n, vocab]."""

    def generate(self, prompt: Sequence[int], max_new_tokens: int, eos: int | None = None) -> Generation:
        if not prompt:
            raise LoweringError("the prompt has no tokens")
        if len(prompt) + max_new_tokens > self.spec.capacity:
            raise LoweringError(f"{len(prompt)} prompt tokens + {max_new_tokens} new ones exceed the cache's "
                                f"{self.spec.capacity} slots (build with a larger --context)")
        self.reset()
        chunk = self.spec.prefill_chunk if "prefill" in self.spec.inputs else 1
        prefill_seconds = 0.0
        for begin in range(0, len(prompt), chunk):
            piece = list(prompt[begin:begin + chunk])
            logits, seconds = self.timed_step("prefill" if "prefill" in self.spec.inputs else "decode", piece, begin)
            prefill_seconds += seconds
        result = Generation([], len(prompt), prefill_seconds)
        token = int(np.argmax(logits[-1]))
        position = len(prompt)
        while True:
            result.tokens.append(token)
            if len(result.tokens) >= max_new_tokens or token == eos:
                break
            logits, seconds = self.timed_step("decode", [token], position)
            result.decode_seconds.append(seconds)
            token, position = int(np.argmax(logits[-1])), position + 1
        result.peak_rss_mb = self.peak_rss_mb()
        return result

    def timed_step(self, phase: str, tokens: Sequence[int], start: int) -> tuple[np.ndarray, float]:
        """`step` and the seconds it took (here: wall time around it)."""
        started = time.perf_counter()
        logits = self.step(phase, tokens, start)
        return logits, time.perf_counter() - started

    def peak_rss_mb(self) -> float | None:
        """Peak memory of where the build runs: this process's maximum resident set."""
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def close(self) -> None:
        """Release what the generator holds (a device session, for RPC runs)."""

    def feeds(self, phase: str, tokens: Sequence[int], start: int) -> dict[str, np.ndarray]:
        """The non-cache inputs of `phase` for `tokens` at `start`, padded to the phase's chunk."""
        size = self.spec.prefill_chunk if phase == "prefill" else 1
        if len(tokens) > size or start + len(tokens) > self.spec.capacity:
            raise LoweringError(f"{len(tokens)} tokens at position {start} do not fit {phase} "
                                f"(chunk {size}, {self.spec.capacity} slots)")
        ids = np.zeros((1, size), np.int64)
        ids[0, :len(tokens)] = tokens
        positions = np.minimum(np.arange(start, start + size, dtype=np.int64), self.spec.capacity - 1)
        mask = np.zeros((1, self.spec.capacity), np.int64)
        mask[0, :start + len(tokens)] = 1
        return {"input_ids": ids, "attention_mask": mask, "position_ids": positions[None, :],
                "cache_position": positions}


class HostGenerator(Generator):
    """A host (llvm) build run by TVM's Relax VM; the caches are updated in place between steps."""

    def __init__(self, executable: Any, weights: Sequence[Any], spec: GeneratorSpec) -> None:
        import tvm
        from tvm import relax

        from passes.lowering._build import host_threads

        super().__init__(spec)
        host_threads()
        self._vm = relax.VirtualMachine(executable, tvm.cpu())
        self._weights = list(weights)
        self._caches: list[Any] = []
        self._functions = {phase: self._vm[phase] for phase in spec.inputs}
        self.reset()

    @classmethod
    def from_folder(cls, folder: Path) -> HostGenerator:
        import tvm

        from passes.lowering._params import load_params

        folder = Path(folder)
        spec = GeneratorSpec.load(folder)
        library = folder / "model.so"
        if not library.is_file():
            raise LoweringError(f"{folder}: no model.so (only host builds run on this machine; run a device build "
                                f"there with --tracker HOST:PORT --key KEY)")
        return cls(tvm.runtime.load_module(str(library)), load_params(folder / "params"), spec)

    def reset(self) -> None:
        import tvm

        self._caches = [tvm.runtime.tensor(np.zeros(self.spec.cache_shape, self.spec.cache_dtype))
                        for _ in self.spec.caches]

    def step(self, phase: str, tokens: Sequence[int], start: int) -> np.ndarray:
        import tvm

        feeds = self.feeds(phase, tokens, start)
        caches = dict(zip(self.spec.caches, self._caches))
        arguments = [caches[name] if name in caches else tvm.runtime.tensor(feeds[name])
                     for name in self.spec.inputs[phase]]
        results = self._functions[phase](*arguments, *self._weights)
        named = dict(zip(self.spec.outputs[phase], results))
        self._caches = [named[name] for name in self.spec.cache_outputs]  # the same tensors when in place
        return named[self.spec.logits].numpy()[0, :len(tokens)]


class OrtGenerator(Generator):
    """The same static-cache graph under onnxruntime: the reference a build's tokens are compared with.

    `exact` runs it as `passes.numerics.verify.ModelRunner` does (integer matmuls exact on every CPU,
    graph optimisations off: a reference, not a speed peer; `weights` gives the values of a hollow model's
    initializers, read where they lie); otherwise a plain session on `threads`."""

    def __init__(self, model: Path | onnx.ModelProto, spec: GeneratorSpec, threads: int | None = None,
                 exact: bool = False, weights: Mapping[str, np.ndarray] | None = None) -> None:
        import onnxruntime as ort

        super().__init__(spec)
        if exact:
            from passes.numerics.verify import ModelRunner

            runner = ModelRunner(model if isinstance(model, onnx.ModelProto) else onnx.load_model(str(model)),
                                 weights=weights)
            self._run = lambda names, feeds: [runner(feeds)[name] for name in names]
            self._names = list(spec.inputs["decode"])
        else:
            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
            options.log_severity_level = 3
            source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
            session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
            self._run = session.run
            self._names = [value.name for value in session.get_inputs()]
        self._caches: list[np.ndarray] = []
        self.reset()

    def reset(self) -> None:
        self._caches = [np.zeros(self.spec.cache_shape, self.spec.cache_dtype) for _ in self.spec.caches]

    def feeds(self, phase: str, tokens: Sequence[int], start: int) -> dict[str, np.ndarray]:
        padded = super().feeds(phase, tokens, start)  # the graph's seq dim is dynamic: no padding needed
        count = len(tokens)
        return {"input_ids": padded["input_ids"][:, :count], "attention_mask": padded["attention_mask"],
                "position_ids": padded["position_ids"][:, :count], "cache_position": padded["cache_position"][:count]}

    def step(self, phase: str, tokens: Sequence[int], start: int) -> np.ndarray:
        feeds = self.feeds(phase, tokens, start) | dict(zip(self.spec.caches, self._caches))
        outputs = self.spec.outputs[phase]
        named = dict(zip(outputs, self._run(outputs, {name: feeds[name] for name in self._names})))
        self._caches = [named[name] for name in self.spec.cache_outputs]
        return named[self.spec.logits][0, :len(tokens)]


class RemoteGenerator(Generator):
    """A build run on a device behind a TVM RPC tracker (a phone running TVM's RPC server).

    The library and the tensor cache are uploaded once per session; the device's own runtime loads the
    weights (`vm.builtin.tensor_cache.load`, as an app does) and the caches live on the device between
    steps, written in place there. Only the feeds go up and the logits come back per step. A step's time is
    the device's (TVM's time evaluator around the VM call, after one untimed run of the same step: a step
    writes the same cache slots with the same values, so running it twice changes nothing); the network's
    round trips are not counted.

    The library: `model.so` when the folder has one (host builds), else `model.tar` linked here with the
    Android NDK when `TVM_NDK_CC` names its compiler, else `model.tar` as is, which a Python RPC server links
    with its own compiler (Linux boards, Termux)."""

    def __init__(self, session: Any, folder: Path, spec: GeneratorSpec,
                 on_stage: Callable[[str], None] = lambda _: None) -> None:
        super().__init__(spec)
        from tvm import relax

        from passes.lowering._params import cache_files, param_order, read_index

        self._session = session
        self.device = getattr(session, spec.device)(0)
        with _library_for_device(folder, on_stage) as library:
            on_stage(f"uploading {library.name}")
            session.upload(str(library))
        on_stage(f"loading {library.name} on the device")
        module = session.load_module(library.name)
        index = read_index(folder / "params")
        files = cache_files(folder / "params", index)
        total = sum(path.stat().st_size for path in files)
        sent = 0
        for path in files:  # the RPC server's work folder is flat: the cache's files sit at its top
            on_stage(f"uploading the weights ({sent / 2**20:.0f} of {total / 2**20:.0f} MB)")
            session.upload(str(path), target=path.name)
            sent += path.stat().st_size
        on_stage("loading the weights on the device")
        work = session.get_function("tvm.rpc.server.workpath")("")
        local_type = self.device.dlpack_device_type() % RPC_SESSION_MASK  # the type as the device's runtime sees it
        session.get_function("vm.builtin.tensor_cache.load")(work, local_type, self.device.index)
        get = session.get_function("vm.builtin.tensor_cache.get")
        self._weights = [get(name) for name in param_order(index)]
        session.get_function("vm.builtin.tensor_cache.clear")()  # the weights stay alive through our handles
        self._vm = relax.VirtualMachine(module, self.device)
        self._timers = {phase: self._vm.time_evaluator("invoke_stateful", self.device, number=1, repeat=1)
                        for phase in spec.inputs}
        self._caches: list[Any] = []
        self.reset()

    @classmethod
    def connect(cls, folder: Path, tracker: Any, timeout_s: float = 600.0,
                on_stage: Callable[[str], None] = lambda _: None) -> RemoteGenerator:
        from passes.lowering._rpc import request_session

        folder = Path(folder)
        spec = GeneratorSpec.load(folder)
        on_stage(f"asking the tracker {tracker} for a device")
        return cls(request_session(tracker, timeout_s), folder, spec, on_stage)

    def reset(self) -> None:
        import tvm

        self._caches = [tvm.runtime.tensor(np.zeros(self.spec.cache_shape, self.spec.cache_dtype), self.device)
                        for _ in self.spec.caches]

    def step(self, phase: str, tokens: Sequence[int], start: int) -> np.ndarray:
        return self.timed_step(phase, tokens, start)[0]

    def timed_step(self, phase: str, tokens: Sequence[int], start: int) -> tuple[np.ndarray, float]:
        import tvm

        feeds = self.feeds(phase, tokens, start)
        caches = dict(zip(self.spec.caches, self._caches))
        arguments = [caches[name] if name in caches else tvm.runtime.tensor(feeds[name], self.device)
                     for name in self.spec.inputs[phase]]
        self._vm.set_input(phase, *arguments, *self._weights)
        seconds = self._timers[phase](phase).mean
        named = dict(zip(self.spec.outputs[phase], self._vm.get_outputs(phase)))
        self._caches = [named[name] for name in self.spec.cache_outputs]
        return named[self.spec.logits].numpy()[0, :len(tokens)], seconds

    def peak_rss_mb(self) -> float | None:
        return None  # the device's memory is not visible through RPC

    def close(self) -> None:
        """End the device session now: the server serves one session at a time, and TVM's VM objects hold
        reference cycles that would keep it open until a garbage collection (or its timeout)."""
        import gc

        self._vm = self._session = None
        self._timers, self._weights, self._caches = {}, [], []
        gc.collect()


@contextlib.contextmanager
def _library_for_device(folder: Path, on_stage: Callable[[str], None]) -> Iterator[Path]:
    """The shared library to upload (see RemoteGenerator); a library linked here lives for the block."""
    if (folder / "model.so").is_file():
        yield folder / "model.so"
        return
    archive = folder / "model.tar"
    if not archive.is_file():
        raise LoweringError(f"{folder}: no model.so or model.tar to run")
    if not os.environ.get("TVM_NDK_CC"):
        yield archive
        return
    from tvm.contrib import ndk
    from tvm.support import tar

    on_stage("linking model.tar with the Android NDK (TVM_NDK_CC)")
    with tempfile.TemporaryDirectory(prefix="passes-ndk-") as scratch:
        tar.untar(str(archive), scratch)
        objects = sorted(str(p) for p in Path(scratch).iterdir() if p.suffix in (".o", ".c", ".cc"))
        try:
            ndk.create_shared(str(Path(scratch) / "model.so"), objects)
        except RuntimeError as err:
            message = str(err).strip().splitlines()
            raise LoweringError(f"linking model.tar with TVM_NDK_CC={os.environ['TVM_NDK_CC']} failed: "
                                f"{message[-1] if message else type(err).__name__}") from err
        yield Path(scratch) / "model.so"
