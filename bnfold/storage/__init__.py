"""The storage layer: reading models from every source, saving them atomically, and large models
in bounded memory.

- :mod:`.load`: ``load_model`` / ``open_model`` (paths, protos, onnx_ir models, ONNXPrograms,
  bytes; lazy large files), with :mod:`.structure` (the structural check on load).
- :mod:`.save`: ``save_model`` / ``save_model_located``: one file, in pieces, or with external data.
- :mod:`.external_data`: safe locations, per-tensor reads, copying data between files.
- :mod:`.spill`: ``FileStore`` (the pass's tensor store) and ``Spill`` (folded tensors on disk).
- :mod:`.embedded` and :mod:`.wire`: large embedded weights left in the model file until saved.
- :mod:`.atomic`: ``write_atomic`` and ``signals_deferred``.
- :mod:`.policy`: ``StoragePolicy``, the size thresholds, handed down to every step.

A model is loaded without its external data. The pass reads only the tensors a fold needs, each
one on its own; folded tensors are written to a spill file as soon as they are made, so they never
accumulate in memory. Saving streams every untouched tensor from its source file into the output's
data file and appends the folded ones from the spill file. A large single-file model gets the same
treatment for its embedded weights: they stay in the model file until saved, and the saved file
has the bytes ``onnx.save`` would write.

This layer imports only the standard library, numpy, onnx/protobuf, :mod:`bnfold.errors`, the
tensor store of :mod:`bnfold.onnx` and ``may_have_subgraphs`` of the graph index; never the CLI,
the API, verification, onnxruntime or torch.
"""
