"""Build the allocator shim with the system C compiler; needs no CUDA at build time."""
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
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra"],
        )
    ]
)
