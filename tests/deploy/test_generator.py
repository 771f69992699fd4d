"""`passes run` on a KV-cache export builds a generator; `passes generate` runs it.

Sample: tiny-llama with a KV cache (2 layers, GQA 4 / 2 heads, vocab 256, random weights), built for the
host with a 32-slot cache and 8-token prefill chunks. Greedy tokens are compared exactly (argmax over
logits that agree to ~1e-7 relative; the seeded prompt has no near-ties, which the equality would show).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from passes.cli import main
from passes.core.io import save_model
from passes.deploy.run import run_for_target
from passes.samples import build_sample
from tests.helpers import free_port, greedy_with_growing_cache, rpc_tracker

pytestmark = pytest.mark.slow

CONTEXT, CHUNK = 32, 8
PROMPT = [5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 200]  # 11 tokens: one full prefill chunk and a partial one


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("kv") / "sample_kv.onnx"
    save_model(build_sample("tiny-llama", kv_cache=True, kv_heads=2), path)
    return path


@pytest.fixture(scope="module")
def fp32_build(sample: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("fp32")
    report = run_for_target(sample, "host", out, quantize="none", context=CONTEXT, prefill_chunk=CHUNK)
    return out / "host", report


def test_a_kv_export_builds_prefill_and_decode_over_one_weight_set(fp32_build: tuple[Path, object]) -> None:
    folder, report = fp32_build
    gen = report.generator  # type: ignore[attr-defined]
    assert gen["phases"] == {"prefill": {"tokens": CHUNK}, "decode": {"tokens": 1}}
    assert gen["context"] == CONTEXT and gen["caches"] == 4 and gen["cache_shape"] == [1, 2, CONTEXT, 16]
    assert gen["cache_writes_in_place"] == 8  # 4 caches x 2 phases
    assert report.roofline["kv_cache_bytes_per_token"] == 4 * 2 * CONTEXT * 16 * 4  # read whole, every step
    check = report.host_check  # type: ignore[attr-defined]
    assert check["passed"] and check["criterion"] == "allclose" and check["decode_steps"] == 3
    for name in ("model.tar", "model.so", "generator.json", "params/tensor-cache.json", "model.onnx"):
        assert (folder / name).is_file(), name
    # weights once, outside the code: params/ holds every weight of the static graph, the code none
    index = json.loads((folder / "params" / "tensor-cache.json").read_text())
    stored = sum(record["nbytes"] for shard in index["records"] for record in shard["records"])
    graph = onnx.load_model(str(folder / "model.onnx")).graph
    sizes = {t.name: onnx.numpy_helper.to_array(t).nbytes for t in graph.initializer}
    matmul_weights = sum(sizes.get(n.input[1], 0) for n in graph.node if n.op_type == "MatMul")
    embedding = sum(sizes.get(n.input[0], 0) for n in graph.node if n.op_type == "Gather")
    # every matmul weight and the embedding once (the rotary tables fold to the rows the context reads)
    assert gen["weights"]["bytes"] == stored and matmul_weights + embedding <= stored <= sum(sizes.values())
    names = {record["name"] for shard in index["records"] for record in shard["records"]}
    assert len(names) == gen["weights"]["tensors"]


def test_greedy_tokens_equal_onnxruntime_on_the_original_export(sample: Path, fp32_build: tuple[Path, object]) -> None:
    from passes.deploy.generate import generate_tokens

    folder, _ = fp32_build
    report = generate_tokens(folder, prompt_ids=PROMPT, max_new_tokens=CONTEXT - len(PROMPT))
    assert report.reference is not None and report.reference["tokens_equal"]
    assert report.tokens == greedy_with_growing_cache(sample, PROMPT, CONTEXT - len(PROMPT))
    assert report.build["decode_tokens_per_s"] > 0 and report.build["decode_latency_ms"]["p90"] > 0


def test_the_cache_is_written_in_place(fp32_build: tuple[Path, object]) -> None:
    """The decode function mutates the cache tensors it is given: no copy of the cache per step."""
    import tvm

    from passes.lowering._generate import HostGenerator

    folder, _ = fp32_build
    generator = HostGenerator.from_folder(folder)
    given = list(generator._caches)
    before = given[0].numpy().copy()
    generator.step("prefill", PROMPT[:5], 0)
    after = given[0].numpy()  # the tensor passed in, read back
    # the chunk's 8 slots are written (5 tokens and 3 of padding, overwritten before anyone reads them)
    assert np.abs(after[:, :, :5]).max() > 0 and np.array_equal(before[:, :, CHUNK:], after[:, :, CHUNK:])
    assert all(isinstance(t, tvm.runtime.Tensor) for t in generator._caches)


def test_a_quantized_generator_is_as_accurate_as_the_reference(sample: Path, tmp_path: Path) -> None:
    report = run_for_target(sample, "host", tmp_path, context=CONTEXT, prefill_chunk=CHUNK)  # auto: W8A8
    assert report.quantization is not None and report.quantization["scheme"] == "w8a8-dynamic"
    assert report.host_check["passed"]
    assert report.dispatched  # int8 matmuls went to the host's int8 kernels


def test_a_gpu_generator_builds_opencl_kernels_and_a_params_file(sample: Path, tmp_path: Path) -> None:
    report = run_for_target(sample, "sd8gen2", tmp_path, context=CONTEXT, prefill_chunk=CHUNK)
    folder = tmp_path / "sd8gen2"
    assert report.host_check is None and (folder / "params" / "tensor-cache.json").is_file()
    assert any(path.name.startswith("kv_cache_write") for path in (folder / "kernels").glob("*.cl"))
    assert report.generator["cache_writes_in_place"] == 8
    assert json.loads((folder / "generator.json").read_text())["device"] == "cl"  # what an RPC run opens


def _cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_generate_json_and_errors(fp32_build: tuple[Path, object], capsys: pytest.CaptureFixture[str]) -> None:
    folder, _ = fp32_build
    code, out, _ = _cli(capsys, "generate", folder, "--prompt-ids", "1,2,3", "-n", "4", "--json")
    assert code == 0
    data = json.loads(out)
    assert len(data["tokens"]) == 4 and data["reference"]["tokens_equal"]
    for argv, message in [(["--prompt-ids", "1,2,3", "-n", CONTEXT], "exceed the cache's 32 slots"),
                          (["--prompt-ids", "1,999"], "must lie in [0, 256)"),
                          (["--prompt-ids", "1,x"], "comma-separated integers"),
                          (["--prompt", "hello"], "--prompt needs --tokenizer")]:
        code, out, err = _cli(capsys, "generate", folder, *argv)
        assert code != 0 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    code, _, err = _cli(capsys, "generate", folder.parent, "--prompt-ids", "1")
    assert code != 0 and "no generator.json" in err


def test_generate_through_an_rpc_tracker_runs_on_the_device_and_equals_the_local_run(
        fp32_build: tuple[Path, object], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`passes generate --tracker`: the library and the tensor cache go up to an RPC server (here on
    loopback), its runtime loads the weights and keeps the caches; the tokens are the host run's. Without
    model.so the server links model.tar itself (what a Python RPC server on a board does)."""
    import shutil

    from passes.deploy.generate import generate_tokens

    folder, _ = fp32_build
    local = generate_tokens(folder, prompt_ids=PROMPT, max_new_tokens=12, compare=False)
    archive_only = tmp_path / "archive-only"
    shutil.copytree(folder, archive_only)
    (archive_only / "model.so").unlink()
    stages: list[str] = []
    with rpc_tracker(tmp_path, "passes-generate") as (tracker, logs):
        remote = generate_tokens(folder, prompt_ids=PROMPT, max_new_tokens=12, tracker=tracker, on_stage=stages.append)
        linked = generate_tokens(archive_only, prompt_ids=PROMPT, max_new_tokens=12, compare=False, tracker=tracker)
        code, out, err = _cli(capsys, "generate", folder, "--prompt-ids", "1,2,3", "-n", "3", "--json",
                              "--tracker", f"{tracker.host}:{tracker.port}", "--key", tracker.key)
    assert remote.tokens == local.tokens == linked.tokens
    assert remote.reference is not None and remote.reference["tokens_equal"]
    assert remote.reference["decode_speedup"] is None  # different machines: no ratio
    assert remote.ran_on.startswith("TVM RPC tracker 127.0.0.1") and remote.threads is None
    assert remote.build["peak_rss_mb"] is None and remote.build["decode_tokens_per_s"] > 0
    assert len(remote.build["decode_latency_ms"]) == 2 and remote.build["decode_latency_ms"]["p50"] > 0
    assert any("uploading the weights" in s for s in stages) and any("loading the weights" in s for s in stages)
    assert "model.tar" in logs[0].read_text() or "load_module" in logs[0].read_text()
    assert code == 0, err
    data = json.loads(out)
    assert data["ran_on"].startswith("TVM RPC tracker") and data["reference"]["tokens_equal"]


def test_generate_through_a_tracker_errors_are_one_line(fp32_build: tuple[Path, object],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    folder, _ = fp32_build
    nobody = f"127.0.0.1:{free_port()}"
    for argv, message in [(["--tracker", nobody], "--tracker needs --key"),
                          (["--key", "phone"], "--key needs --tracker"),
                          (["--tracker", "nohost", "--key", "phone"], "--tracker must be HOST:PORT"),
                          (["--tracker", nobody, "--key", "phone"], "no TVM RPC tracker answers")]:
        code, _, err = _cli(capsys, "generate", folder, "--prompt-ids", "1,2", *argv)
        assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_context_options_need_a_kv_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain = tmp_path / "plain.onnx"
    save_model(build_sample("tiny-llama"), plain)
    code, _, err = _cli(capsys, "run", plain, "-t", "host", "-o", tmp_path / "o", "--context", "64")
    assert code != 0 and "apply to decoder exports with a KV cache" in err
    assert not (tmp_path / "o" / "host").exists()
