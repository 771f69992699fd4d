"""`passes.numerics`: running models (onnxruntime, onnx.reference, the exact integer reference), seeded
feeds, comparison, accuracy and calibration. Imports `passes.core` only; never TVM."""
