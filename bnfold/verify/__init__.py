"""Verification: run two models in onnxruntime (optimizations off) on the same inputs and compare
every output. onnxruntime is imported only here, and only when a model is run."""
