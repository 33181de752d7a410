"""Layer-aware activation quantization (LAAQ)."""
