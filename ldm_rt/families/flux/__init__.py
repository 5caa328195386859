"""FLUX.1 (schnell, dev): reference transformer, config presets and pure sampling functions."""
