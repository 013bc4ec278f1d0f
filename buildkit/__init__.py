"""What exporter, quantize and deploy share to write model folders: the ONNX graph writer, atomic output and the block-quantization formats."""
