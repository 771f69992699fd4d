"""`passes.core`: the graph IR helpers (onnx-graphsurgeon), safe model I/O, the error types, and the
numpy constant evaluator. The bottom layer: imports nothing else of `passes`."""
