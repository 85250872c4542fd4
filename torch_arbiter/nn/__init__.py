"""Holo modules: layers whose weights sit at a live HoloTensor level (see :mod:`.modules`)."""

from .modules import HoloConv2d, HoloEmbedding, HoloLinear, cpu_kernels_available

__all__ = ["HoloLinear", "HoloConv2d", "HoloEmbedding", "cpu_kernels_available"]
