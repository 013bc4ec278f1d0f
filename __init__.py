"""edgellama: Llama-family models to ONNX, quantized and run on the edge."""

__version__ = "0.1.0"
