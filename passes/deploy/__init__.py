"""`passes.deploy`: what `passes run` makes of a model for a target (prepare = bind dims + pipeline +
quantize, build, artifacts, manifest, report, roofline). Imports every layer below it, never the CLI."""
