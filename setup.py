"""The optional native hot path of the shm transport (framework/comm/_shm_native.c).

Everything else is in pyproject.toml. ``optional=True``: a host without a C compiler still
installs commlab, and ``strategy=shm`` falls back to its Python path with one warning.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "framework.comm._shm_native",
            ["framework/comm/_shm_native.c"],
            extra_compile_args=["-O3", "-std=gnu11", "-fno-strict-aliasing"],
            optional=True,
        )
    ]
)
