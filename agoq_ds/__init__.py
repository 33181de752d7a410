"""agoq-ds: AGoQ activation and gradient quantization for DeepSpeed."""
