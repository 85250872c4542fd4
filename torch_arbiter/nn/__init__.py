"""Holo modules: layers whose weights sit at a live HoloTensor level (see :mod:`.modules`)."""

from .modules import HoloConv2d, HoloEmbedding, HoloLinear, int4_kernel_block

__all__ = ["HoloLinear", "HoloConv2d", "HoloEmbedding", "int4_kernel_block"]
