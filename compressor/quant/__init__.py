"""Quantization core: specs, arithmetic, activation statistics and histograms."""
