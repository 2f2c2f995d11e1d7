"""Tensor kernels several methods share: pure functions of float32 tensors, no I/O.

This package's own namespace stays free of torch, so the spec (which only validates
settings) can state its defaults from here without importing it.
"""

DEFAULT_RANK_RATIO = 0.12
"""CART's rank ratio wherever none is given: the paper's best ranks are small (8–16% of
min(m, n))."""
