"""freeze-shapes: structure, numerics, refusal, property."""

from __future__ import annotations

import onnx
import pytest
from hypothesis import given

from passes.core.errors import PassContractError
from passes.core.ir import import_graph
from passes.testing import assert_equivalent, assert_pass_sound
from passes.testing.strategies import shape_chain_graphs, test_dims
from passes.transforms.freeze_shapes import FreezeShapes, count_dynamic_shapes
from tests.helpers import ops

SAMPLES = [("tiny-llama", "torchscript"), ("tiny-llama", "dynamo"), ("tiny-bert", "torchscript"), ("tiny-bert", "dynamo")]


@pytest.mark.parametrize(("name", "idiom"), SAMPLES)
def test_structure_and_numerics_every_shape_chain_folds(sample_model, name: str, idiom: str) -> None:  # type: ignore[no-untyped-def]
    original = sample_model(name, idiom=idiom)
    assert count_dynamic_shapes(import_graph(original)) > 0
    result = FreezeShapes(shapes={"input_ids": (2, 8)})(original)
    assert result.stats["dynamic_shape_inputs_left"] == 0
    assert "Shape" not in ops(result.model) and "Constant" not in ops(result.model)
    for value in result.model.graph.input:  # attention_mask shares batch/seq with input_ids: bound too
        assert [d.dim_value for d in value.type.tensor_type.shape.dim] == [2, 8]
    assert_equivalent(original, result.model, rtol=0, atol=0, input_shapes={"input_ids": (2, 8)})
    assert not FreezeShapes(shapes={"input_ids": (2, 8)})(result.model).modified


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        ({"nope": (1, 8)}, "no graph input 'nope' (inputs: input_ids, attention_mask)"),
        ({"input_ids": (1, 8, 1)}, "has rank 2, but 3 dims were given"),
        ({"input_ids": (1, 8), "attention_mask": (1, 9)}, "dim 'seq' is bound to both 8 and 9"),
    ],
)
def test_refusal_bad_bindings_name_the_input(sample_model, shapes, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PassContractError, match="freeze-shapes") as info:
        FreezeShapes(shapes=shapes)(sample_model("tiny-bert"))
    assert message in str(info.value)


def test_refusal_fixed_dim_cannot_be_rebound(sample_model) -> None:  # type: ignore[no-untyped-def]
    frozen = FreezeShapes(shapes={"input_ids": (1, 8)})(sample_model("tiny-llama")).model
    with pytest.raises(PassContractError, match="dim 1 is fixed at 8, cannot bind it to 16"):
        FreezeShapes(shapes={"input_ids": (1, 16)})(frozen)


@given(shape_chain_graphs())
def test_property_chains_fold_completely(original: onnx.ModelProto) -> None:
    dims = {name: tuple(d) for name, d in test_dims(original).items()}
    once = assert_pass_sound(FreezeShapes(shapes=dims), original, rtol=1e-6, atol=1e-6, input_shapes=dims)
    assert once.stats["dynamic_shape_inputs_left"] == 0
