"""Models: custom layers, the architecture registry, feature taps, FLOPs and model loading."""
