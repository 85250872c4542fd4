"""Build the C parts with the system C compiler (plain shared objects loaded through ctypes; no CUDA,
no torch headers at build time): the allocator shim and the Holo modules' CPU kernels."""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "torch_arbiter.allocator._arbiter_alloc",
            sources=[
                "torch_arbiter/allocator/arbiter_alloc.c",
                "torch_arbiter/allocator/ledger.c",
            ],
            depends=[
                "torch_arbiter/allocator/arbiter_alloc.h",
                "torch_arbiter/allocator/ledger.h",
            ],
            libraries=["dl", "rt", "pthread"],
            # -fexceptions: global mode's out-of-memory handler throws a C++ exception through
            # torch_arbiter_alloc (see oom.cpp).
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-fexceptions"],
        ),
        Extension(
            "torch_arbiter.nn._holo_kernels",
            sources=["torch_arbiter/nn/holo_kernels.c"],
            libraries=["m"],
            extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wextra"],
        ),
    ]
)
