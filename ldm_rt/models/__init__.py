"""Reference PyTorch modules: the source of truth every backend is held to."""
