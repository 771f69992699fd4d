"""`passes.transforms`: the rewrite passes, one per module, each named after its pass (`fold_constants.py`
is `fold-constants`). May import core, numerics (calibration) and infra; never TVM or the layers above.

Nothing here is imported by `import passes`: the registry imports a pass module the first time a
pipeline names it.
"""
