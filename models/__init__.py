"""Bundled test models for bnfold: torch definitions, the ONNX generator and the case registry."""
