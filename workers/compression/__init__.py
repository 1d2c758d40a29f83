"""Compression algorithms: Taylor, AGP and Distiller schedules, RigL, importance criteria, regularizers,
quantization."""
