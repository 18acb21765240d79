"""The framework-free engine: reading optimizer state, the per-step pipeline, the sinks."""
