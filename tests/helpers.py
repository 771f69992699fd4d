"""Small builders for hand-written test graphs."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def tensor(name: str, shape: Sequence[int | str | None], dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, list(shape))


def init(name: str, value: np.ndarray | Sequence[float] | Sequence[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: Sequence[onnx.TensorProto] = (),
    *,
    opset: int = 17,
    check: bool = True,
) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "test", list(inputs), list(outputs), list(initializers))
    domains = {n.domain for n in nodes if n.domain not in ("", "ai.onnx")}
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in sorted(domains)]
    made = helper.make_model(graph, opset_imports=opsets)
    made.ir_version = 8
    if check:
        onnx.checker.check_model(made, full_check=True)
    return made


def ops(m: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in m.graph.node]


def greedy_with_growing_cache(path: str | os.PathLike[str], prompt: list[int], new: int) -> list[int]:
    """onnxruntime on the export as exported: the prompt in one call, then a token per call, presents fed back."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    caches = {n: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for n, i in inputs.items() if n.startswith("past")}
    step, position, out = list(prompt), 0, []
    while len(out) < new:
        total = position + len(step)
        feeds = {"input_ids": np.array([step], np.int64), "attention_mask": np.ones((1, total), np.int64),
                 "position_ids": np.arange(position, total, dtype=np.int64)[None]} | caches
        results = dict(zip(names, session.run(names, feeds)))
        caches = {n: results[n.replace("past_key_values", "present")] for n in caches}
        out.append(int(np.argmax(results["logits"][0, -1])))
        position, step = total, [out[-1]]
    return out


def _cache_inputs(m: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    return [v for v in m.graph.input if v.name.startswith("past_key_values")]


def run_growing_cache(m: onnx.ModelProto, tokens: np.ndarray, past: int) -> dict[str, np.ndarray]:
    """A KV-cache export run as exported: tokens[:past] with an empty past, then the rest with the
    presents fed back as the past (the cache grows by Concat). The last call's outputs."""
    from passes.testing import run_model

    heads, depth = (_cache_inputs(m)[0].type.tensor_type.shape.dim[i].dim_value for i in (1, 3))
    caches = {v.name: np.zeros((1, heads, 0, depth), np.float32) for v in _cache_inputs(m)}
    out: dict[str, np.ndarray] = {}
    for begin, end in ((0, past), (past, len(tokens))):
        if begin == end:
            continue
        feeds = {"input_ids": tokens[None, begin:end], "attention_mask": np.ones((1, end), np.int64),
                 "position_ids": np.arange(begin, end, dtype=np.int64)[None]} | caches
        out = run_model(m, feeds)
        caches = {name: out[name.replace("past_key_values", "present")] for name in caches}
    return out


def run_static_cache(m: onnx.ModelProto, tokens: np.ndarray, past: int, capacity: int,
                     seed: int = 7) -> dict[str, np.ndarray]:
    """The same two calls on a `static-kv-cache` graph: a fixed cache whose unused slots hold seeded
    garbage (they must not matter), the new tokens written at `cache_position`."""
    from passes.testing import run_model
    from passes.transforms.static_kv_cache import CACHE_POSITION

    rng = np.random.default_rng(seed)
    caches = {v.name: rng.standard_normal([1, *(d.dim_value for d in v.type.tensor_type.shape.dim[1:])])
              .astype(np.float32) for v in _cache_inputs(m)}
    out: dict[str, np.ndarray] = {}
    for begin, end in ((0, past), (past, len(tokens))):
        if begin == end:
            continue
        mask = np.zeros((1, capacity), np.int64)
        mask[0, :end] = 1
        positions = np.arange(begin, end, dtype=np.int64)
        feeds = {"input_ids": tokens[None, begin:end], "attention_mask": mask, "position_ids": positions[None],
                 CACHE_POSITION: positions} | caches
        out = run_model(m, feeds)
        caches = {name: out[name.replace("past_key_values", "present")] for name in caches}
    return out


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def rpc_tracker(logs: Path, key: str, servers: int = 1, timeout: float = 60.0) -> Iterator[tuple[Any, list[Path]]]:
    """A TVM RPC tracker on loopback with `servers` RPC servers registered under `key` (each a process
    logging to logs/server{i}.log); yields (Tracker, log paths) once all have registered."""
    import subprocess
    import sys
    import time

    from passes.lowering._rpc import Tracker, count_servers

    tracker = Tracker("127.0.0.1", free_port(), key)
    scratch = Path(logs) / "rpc-tmp"  # the servers are killed, never left to remove their upload folders
    scratch.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(scratch)}
    processes = [subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1",
                                   "--port", str(tracker.port), "--port-end", str(tracker.port + 1)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                                  start_new_session=True)]
    paths = [Path(logs) / f"server{i}.log" for i in range(servers)]
    try:
        time.sleep(2.0)
        for path in paths:
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(free_port()),
                 "--port-end", "65000", "--tracker", f"127.0.0.1:{tracker.port}", "--key", key],
                stdout=path.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True))
        deadline = time.monotonic() + timeout
        while True:
            try:
                if count_servers(tracker) >= servers:
                    break
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{servers} RPC servers did not register with the tracker")
            time.sleep(0.5)
        yield tracker, paths
    finally:
        import signal

        for process in reversed(processes):  # the servers fork a process per session: kill the groups
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
