"""Step-specialized ONNX export and the torch-free ONNX Runtime TPRR runtime (planned)."""
