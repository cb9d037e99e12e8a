"""Low-bit weights: formats, quantization, and which format each matrix loads in."""
