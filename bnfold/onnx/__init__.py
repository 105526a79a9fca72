"""The ONNX side of bnfold: the graph view over raw protobuf, constants, shapes, and the driver that
applies fold plans. Never imports storage or the command line: tensor data is reached through the
:class:`~bnfold.onnx.tensor_store.TensorStore` handed to the pass."""
