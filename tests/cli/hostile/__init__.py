"""A seeded corpus of hostile and unusual `passes` command lines (issue "Hostile and unusual input").

`cases(seed)` returns `Case`s. Each one writes its files into a fresh folder (`setup(folder) -> argv`,
every path inside that folder, or under /proc where nothing can be written), names the exit codes that
are right for it, and names (as fnmatch patterns relative to the folder) the paths a successful run may
create or replace. `test_hostile.py` runs them in-process and checks the CLI's contract.

Base models: a MatMul/Add/Relu chain (`X[N,4] -> Y[N,4]`, weights in raw_data) and the 1-layer
tiny-llama sample. Everything random comes from `random.Random(seed)`.

The families live in modules by kind: `_base` (the `Case` record, exit codes, base models, shared
helpers), `damaged` (truncated, bit-flipped, empty and foreign files, wrong messages), `fields` (bad
dtypes, dims, data, element types, graphs, opsets, casts, sparse initializers), `external` (external
data), `names` (odd names, `-o` and `--dump-ir` targets) and `arguments` (pipelines, shapes, verify,
usage, run).
"""

from __future__ import annotations

import random

from ._base import FAMILIES, Case
from .arguments import _pipelines, _run, _shapes, _usage, _verify
from .damaged import _bitflip, _empty_and_foreign, _truncated, _wrong_proto
from .external import _external_data
from .fields import _casts, _graph_defects, _invalid_tensors, _opsets, _sparse
from .names import _dump_ir, _names, _outputs

__all__ = ["FAMILIES", "Case", "cases"]


def cases(seed: int = 0) -> list[Case]:
    """Every hostile case; `seed` picks the truncation offsets and byte mutations."""
    rng = random.Random(seed)
    families = (
        _truncated(rng), _bitflip(rng), _empty_and_foreign(rng), _wrong_proto(), _invalid_tensors(),
        _graph_defects(), _opsets(), _casts(), _sparse(), _external_data(), _names(), _pipelines(), _shapes(),
        _outputs(), _dump_ir(), _verify(), _usage(), _run(),
    )
    corpus = [case for family in families for case in family]
    seen: set[str] = set()
    for case in corpus:
        if case.id in seen:
            raise ValueError(f"duplicate hostile case id {case.id!r}")
        seen.add(case.id)
    return corpus
