"""`passes run`: every bundled target builds the sample and writes its artifacts; the host build
matches the exact reference; the report's figures are honest; bad input fails with one line."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from passes.cli import main
from passes.core.io import save_model
from passes.deploy.roofline import estimate, weight_traffic
from passes.deploy.run import run_for_target
from passes.frontend.prepare import bind_dims
from passes.samples import build_sample
from passes.targets import list_targets, load_target
from tests.helpers import init, model, tensor

pytestmark = pytest.mark.slow

#: every bundled target, plus the CPU variant of one SoC
TARGETS = [name for name in list_targets() if ":" not in name] + ["sd8gen2:cpu"]


@pytest.fixture(scope="module")
def sample_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sample") / "tiny-llama.onnx"
    save_model(build_sample("tiny-llama"), path)
    return path


@pytest.mark.parametrize("target", TARGETS)
def test_every_target_builds_the_sample(sample_path: Path, tmp_path: Path, target: str) -> None:
    report = run_for_target(sample_path, target, tmp_path, input_shapes={"input_ids": (1, 16)})
    folder = tmp_path / target.replace(":", "-")
    assert Path(report.output_dir) == folder
    umask = os.umask(0o22)
    os.umask(umask)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask  # what mkdir gives, not mkdtemp's 0700
    for name in ("model.onnx", "model.tar", "manifest.json", "report.json"):
        assert (folder / name).is_file(), name
    description = load_target(target)
    kernels = sorted((folder / "kernels").glob("*")) if (folder / "kernels").exists() else []
    if description.backend == "opencl":
        assert kernels and all(k.suffix == ".cl" and "__kernel" in k.read_text() for k in kernels)
    elif description.backend == "metal":
        assert kernels and all(k.suffix == ".metal" and "kernel void" in k.read_text() for k in kernels)
    else:
        assert not kernels
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["inputs"] == [{"name": "input_ids", "dtype": "int64", "shape": [1, 16]}]
    assert set(manifest["sha256"]) >= {"model.onnx", "model.tar"}
    on_disk = json.loads((folder / "report.json").read_text())
    assert on_disk["target"] == target and set(on_disk["artifacts"]) == set(report.artifacts)
    assert onnx.load(str(folder / "model.onnx")).graph.input[0].type.tensor_type.shape.dim[1].dim_value == 16


def test_host_build_runs_and_matches_the_exact_reference(sample_path: Path, tmp_path: Path) -> None:
    report = run_for_target(sample_path, "host", tmp_path)
    assert report.host_check is not None and report.host_check["ok"]
    assert report.host_check["rtol"] == 1e-4 and report.host_check["atol"] == 1e-4
    assert (tmp_path / "host" / "model.so").is_file()
    # no --shape: the dynamic dims come from the target's defaults, and the report says so
    assert [(b.dim, b.value, b.source) for b in report.bound_dims] == [
        ("batch", 1, "target defaults.batch"), ("seq", 128, "target defaults.sequence")
    ]


def test_shape_given_binds_shared_symbols_before_defaults() -> None:
    bert = build_sample("tiny-bert")
    shapes, bound = bind_dims(bert, {"input_ids": (2, 9)}, load_target("sd8gen2"))
    assert shapes == {"input_ids": (2, 9), "attention_mask": (2, 9)}
    assert {(b.input, b.dim, b.source) for b in bound} == {("attention_mask", "batch", "--shape"),
                                                            ("attention_mask", "seq", "--shape")}


def _llama_7b_shapes() -> onnx.ModelProto:
    """Llama-2-7B's weight shapes (no weight bytes: the roofline reads dims only)."""
    hidden, ffn, vocab, layers = 4096, 11008, 32000, 32
    def weight(name: str, dims: list[int]) -> onnx.TensorProto:
        tensor_ = onnx.TensorProto(name=name, data_type=TensorProto.FLOAT)
        tensor_.dims.extend(dims)
        return tensor_

    weights = [weight("embed", [vocab, hidden]), weight("lm_head", [hidden, vocab])]
    nodes = [helper.make_node("Gather", ["embed", "ids"], ["x"]),
             helper.make_node("MatMul", ["x", "lm_head"], ["logits"])]
    outputs = [tensor("logits", [1, 1, vocab])]
    for layer in range(layers):
        for proj, dims in (("q", [hidden, hidden]), ("k", [hidden, hidden]), ("v", [hidden, hidden]),
                           ("o", [hidden, hidden]), ("gate", [hidden, ffn]), ("up", [hidden, ffn]),
                           ("down", [ffn, hidden])):
            name = f"l{layer}.{proj}"
            weights.append(weight(name, dims))
            source = "x" if dims[0] == hidden else "ffn_in"
            if source == "ffn_in" and layer == 0 and proj == "down":
                nodes.append(helper.make_node("MatMul", ["x", "l0.up"], ["ffn_in"]))
            nodes.append(helper.make_node("MatMul", [source, name], [f"{name}.out"]))
            outputs.append(tensor(f"{name}.out", [1, 1, dims[1]]))
    graph = helper.make_graph(nodes, "llama-7b-shapes", [tensor("ids", [1, 1], TensorProto.INT64)], outputs, weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_roofline_is_honest_about_a_7b_model() -> None:
    """~6.6 G matmul weights: ~6.6 GB per token at INT8, so decode on 67.2 GB/s is <= ~10 tok/s."""
    model_7b = _llama_7b_shapes()
    traffic = weight_traffic(model_7b)
    assert traffic.parameters == 32 * (4 * 4096**2 + 3 * 4096 * 11008) + 2 * 32000 * 4096  # 6.74 G
    assert traffic.read_per_token == traffic.parameters - 32000 * 4096 + 4096  # one embedding row
    roof = estimate(model_7b, load_target("sd8gen2"), tokens=1)
    assert 6.6e9 < roof.weight_bytes_per_token["int8"] < 6.7e9
    assert roof.weight_bytes_per_token["fp16"] == 2 * roof.weight_bytes_per_token["int8"]
    assert 10.0 < roof.decode_tokens_per_s["int8"] < 10.2  # 67.2 GB/s / 6.61 GB
    # 2 ops per weight, plus the one extra MatMul that feeds the down projections their input
    assert roof.matmul_ops_per_token == pytest.approx(2 * (traffic.read_per_token - 4096) + 2 * 4096 * 11008)


def test_roofline_small_model_numbers() -> None:
    small = model([helper.make_node("Gather", ["table", "ids"], ["e"]), helper.make_node("MatMul", ["e", "w"], ["y"])],
                  [tensor("ids", [1, 4], TensorProto.INT64)], [tensor("y", [1, 4, 3])],
                  [init("table", np.zeros((100, 8), np.float32)), init("w", np.zeros((8, 3), np.float32))])
    traffic = weight_traffic(small)
    assert (traffic.parameters, traffic.read_per_token) == (824, 8 + 24)  # one table row + the whole weight
    roof = estimate(small, load_target("sd8gen2"), tokens=4)
    assert roof.weight_bytes_per_token == {"fp32": 128, "fp16": 64, "int8": 32, "int4": 16}
    assert roof.decode_tokens_per_s["int8"] == pytest.approx(67.2e9 / 32)
    assert roof.matmul_ops_per_token == 2 * 8 * 3
    assert roof.prefill_peak == "int8" and roof.prefill_tokens_per_s == pytest.approx(8.4e12 / 48)
    host = estimate(small, load_target("host"), tokens=4)
    assert host.decode_tokens_per_s["int8"] is None and host.prefill_tokens_per_s is None
    assert "host states no memory bandwidth: no decode bound" in host.notes


def test_cli_run_and_its_errors(sample_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(sample_path), "--target", "sd888", "-o", str(tmp_path), "--shape", "input_ids=1x8",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["target"] == "sd888"
    assert main(["run", str(sample_path), "--target", "nope", "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "sd8gen2" in err[0]
    bad = tmp_path / "bad.toml"
    bad.write_text('device = "gpu"\nbackend = "cuda"\n')
    assert main(["run", str(sample_path), "--target", str(bad), "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "backend" in err[0]


def test_unsupported_op_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    custom = model([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Mystery", ["r"], ["y"], domain="acme")],
                   [tensor("x", [2, 3])], [tensor("y", [2, 3])], opset=17, check=False)
    path = tmp_path / "custom.onnx"
    onnx.save(custom, str(path))
    assert main(["run", str(path), "--target", "host", "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "Mystery" in err[0]
    assert not (tmp_path / "out" / "host").exists()  # nothing half-written


@pytest.mark.parametrize(("target", "scheme"), [("sd8gen2", "w8a8-dynamic"), ("a16", "w8a16")])
def test_run_quantizes_with_the_targets_scheme(sample_path: Path, tmp_path: Path, target: str, scheme: str) -> None:
    report = run_for_target(sample_path, target, tmp_path, input_shapes={"input_ids": (1, 16)})
    quantization = report.quantization
    assert quantization is not None and quantization["scheme"] == scheme
    assert quantization["chosen_by"] == "target capabilities.quantization"
    assert quantization["matmuls_quantized"] == 9  # fused QKV, o, gate/up, down per layer, and lm_head
    assert quantization["output_sqnr_db"] >= 30.0  # the bar, on inputs calibration did not see
    written = onnx.load(str(tmp_path / target / "model.onnx"))
    ops = {n.op_type for n in written.graph.node}
    assert ("MatMulInteger" in ops) if scheme.startswith("w8a8") else ("DequantizeLinear" in ops)
    if scheme.startswith("w8a8"):  # smoothed, per-token, and every layer accurate enough to stay W8A8
        assert quantization["activations"] == "per-token" and quantization["smoothing"]["activations"] > 0
        assert quantization["mixed_precision"]["w8a8_layers"] == 9 and not quantization["mixed_precision"]["fallback_layers"]
        assert "DynamicQuantizeLinear" not in ops and quantization["warnings"] == []


def test_run_without_quantization_keeps_float_weights(sample_path: Path, tmp_path: Path) -> None:
    report = run_for_target(sample_path, "host", tmp_path, input_shapes={"input_ids": (1, 8)}, quantize="none")
    assert report.quantization is None and report.host_check is not None and report.host_check["ok"]
    ops = {n.op_type for n in onnx.load(str(tmp_path / "host" / "model.onnx")).graph.node}
    assert not ops & {"MatMulInteger", "DequantizeLinear", "QuantizeLinear"}


def test_roofline_decode_reads_the_kv_cache_too() -> None:
    """A generator's decode bound: bandwidth / (weights + the whole cache at the context length). For
    Llama-2-7B at a 4096-token fp16 cache that is 32 layers x K and V x 32 heads x 4096 x 128 x 2 bytes
    = 2.15 GB more per token than its 6.61 GB of INT8 weights: ~7.6 tok/s on 67.2 GB/s instead of ~10."""
    model_7b = _llama_7b_shapes()
    kv = 32 * 2 * 32 * 4096 * 128 * 2
    plain, with_cache = (estimate(model_7b, load_target("sd8gen2"), tokens=1, kv_cache_bytes=b) for b in (0, kv))
    assert with_cache.weight_bytes_per_token["int8"] == plain.weight_bytes_per_token["int8"] + kv
    assert with_cache.decode_tokens_per_s["int8"] == pytest.approx(67.2e9 / (plain.weight_bytes_per_token["int8"] + kv))
    assert 7.5 < with_cache.decode_tokens_per_s["int8"] < 7.8
    assert with_cache.kv_cache_bytes_per_token == kv and any("KV cache" in n for n in with_cache.notes)
