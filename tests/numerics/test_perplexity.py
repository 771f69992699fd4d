"""Perplexity: the negative log-likelihood against a direct computation, windows from text, inputs a causal
LM takes, text calibration, and the errors a user can cause. The tokenizer is a word-level one built
here (`word_tokenizer`); the real SmolLM2 tokenizer is exercised in tests/real_models/test_smollm2.py."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from passes.core.errors import VerificationError
from passes.numerics.calibration import load_calibration
from passes.numerics.perplexity import (
    eval_windows,
    lm_feeds,
    load_tokenizer,
    perplexity,
    perplexity_change,
    text_windows,
    token_nll,
)
from tests.helpers import init, model, tensor

WORDS = [f"w{i}" for i in range(200)]


def word_tokenizer(folder: Path) -> Path:
    """A word-level tokenizer.json over `WORDS` (ids 0..199) in `folder`."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(WORDS)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def text_of(count: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), count))


def bigram_model(vocab: int = 200, *, seed: int = 0, extra_inputs: tuple[str, ...] = ()) -> onnx.ModelProto:
    """logits[b, t] = table[input_ids[b, t]]: a bigram LM (Gather from a [vocab, vocab] table)."""
    table = np.random.default_rng(seed).standard_normal((vocab, vocab)).astype(np.float32)
    node = helper.make_node("Gather", ["table", "input_ids"], ["logits"])
    inputs = [tensor("input_ids", ["batch", "seq"], TensorProto.INT64)]
    inputs += [tensor(name, ["batch", "seq"], TensorProto.INT64) for name in extra_inputs]
    return model([node], inputs, [tensor("logits", ["batch", "seq", vocab])], [init("table", table)])


def test_nll_is_the_log_softmax_of_the_next_token() -> None:
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((2, 5, 7)).astype(np.float32) * 30  # large logits: the log-sum-exp must be stable
    ids = rng.integers(0, 7, (2, 5))
    nll = token_nll(logits, ids)
    for b in range(2):
        for t in range(4):
            row = logits[b, t].astype(np.float64)
            expected = math.log(sum(math.exp(v - row.max()) for v in row)) + row.max() - row[ids[b, t + 1]]
            assert nll[b, t] == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_uniform_logits_give_the_vocabulary_size() -> None:
    vocab = 200
    made = model([helper.make_node("Gather", ["table", "input_ids"], ["logits"])],
                 [tensor("input_ids", [1, "seq"], TensorProto.INT64)], [tensor("logits", [1, "seq", vocab])],
                 [init("table", np.zeros((vocab, vocab), np.float32))])
    result = perplexity(made, np.arange(20, dtype=np.int64).reshape(2, 10))
    assert result.perplexity == pytest.approx(vocab, rel=1e-9) and result.tokens == 18 and result.windows == 2


def test_windows_are_disjoint_spread_and_repeatable(tmp_path: Path) -> None:
    tokenizer = load_tokenizer(word_tokenizer(tmp_path / "tok"))
    text = " ".join(WORDS[i % 200] for i in range(1000))
    windows = text_windows(text, tokenizer, window=16, count=4)
    assert windows.shape == (4, 16) and windows.dtype == np.int64
    assert windows[:, 0].tolist() == [0, 250 % 200, 500 % 200, 750 % 200]  # stride 1000 // 4
    np.testing.assert_array_equal(windows, text_windows(text, tokenizer, window=16, count=4))


def test_feeds_fill_the_mask_and_positions() -> None:
    made = bigram_model(extra_inputs=("attention_mask", "position_ids"))
    feeds = lm_feeds(made, np.array([[5, 6, 7]]))
    assert feeds["attention_mask"].tolist() == [[1, 1, 1]] and feeds["position_ids"].tolist() == [[0, 1, 2]]
    with pytest.raises(VerificationError, match="input 'past' is not one of"):
        lm_feeds(bigram_model(extra_inputs=("past",)), np.array([[1]]))


def test_change_between_a_model_and_itself_is_zero(tmp_path: Path) -> None:
    folder = word_tokenizer(tmp_path / "tok")
    (tmp_path / "eval.txt").write_text(text_of(3000))
    made = bigram_model()
    rows = eval_windows(made, tmp_path / "eval.txt", folder, 4)
    assert len(rows) == 4 and rows[0].shape == (128,)  # symbolic seq: 128-token windows
    change = perplexity_change(made, made, rows)
    assert change["increase_pct"] == 0.0 and change["float"] > 1.0


def test_text_calibration_cuts_windows_at_the_models_shape(tmp_path: Path) -> None:
    folder = word_tokenizer(tmp_path / "tok")
    (tmp_path / "calib.txt").write_text(text_of(2000))
    frozen = model([helper.make_node("Gather", ["table", "input_ids"], ["logits"])],
                   [tensor("input_ids", [2, 24], TensorProto.INT64)], [tensor("logits", [2, 24, 200])],
                   [init("table", np.zeros((200, 200), np.float32))])
    feeds = load_calibration(tmp_path / "calib.txt", frozen, tokenizer=folder, samples=3)
    assert len(feeds) == 3 and all(f["input_ids"].shape == (2, 24) for f in feeds)
    assert len({f["input_ids"].tobytes() for f in feeds}) == 3


def test_npz_calibration_takes_a_leading_sample_axis(tmp_path: Path) -> None:
    made = bigram_model()
    ids = np.arange(3 * 8).reshape(3, 1, 8).astype(np.int64)
    np.savez(tmp_path / "c.npz", input_ids=ids)
    feeds = load_calibration(tmp_path / "c.npz", made)
    assert [f["input_ids"].shape for f in feeds] == [(1, 8)] * 3
    np.savez(tmp_path / "bad.npz", input_ids=ids[None])
    with pytest.raises(VerificationError, match="4-D; the input is 2-D"):
        load_calibration(tmp_path / "bad.npz", made)


@pytest.mark.parametrize(("case", "match"), [
    ("no tokenizer", "no tokenizer at"),
    ("bad tokenizer", "cannot read tokenizer"),
    ("short text", "the text has 10 tokens"),
    ("missing text", "cannot read text"),
])
def test_errors_are_typed_and_name_the_file(tmp_path: Path, case: str, match: str) -> None:
    folder = word_tokenizer(tmp_path / "tok")
    (tmp_path / "short.txt").write_text(text_of(10))
    if case == "bad tokenizer":
        (tmp_path / "broken").mkdir()
        (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    tokenizer_path = {"no tokenizer": tmp_path / "nowhere", "bad tokenizer": tmp_path / "broken"}.get(case, folder)
    text_path = tmp_path / ("absent.txt" if case == "missing text" else "short.txt")
    with pytest.raises(VerificationError, match=match):
        eval_windows(bigram_model(), text_path, tokenizer_path, 2)
