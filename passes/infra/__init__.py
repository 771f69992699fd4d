"""`passes.infra`: the pass infrastructure (Pass, registry, pipeline strings, the pass manager, the
rewrite driver). Imports `passes.core` and `passes.numerics` (the manager's numeric instrument)."""
