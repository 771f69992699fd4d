"""`passes.frontend`: from a model file to the model a back end lowers (bind dims, the target's pipeline,
quantize; `prepare.prepare_model`). Imports core, numerics, infra and transforms; never TVM."""
