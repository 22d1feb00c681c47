"""The few places where JAX 0.10.x (CPU dev machine) and 0.11.x (GPU machine) differ.

Everything version- or backend-dependent is decided here, once, so the rest of the code
reads as plain JAX.
"""
from __future__ import annotations

import os

import jax

JAX_VERSION = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())

KERNEL_MODES = ("pallas", "reference", "interpret")


def default_backend() -> str:
    return jax.default_backend()


def kernel_mode() -> str:
    """Which implementation the kernels dispatch to: `UNSLOTH_JAX_KERNELS` or the backend default.

    pallas    -> compiled Pallas kernels (GPU)
    reference -> the plain-jnp references (default on CPU)
    interpret -> Pallas kernels run by the Pallas interpreter (CPU tests of the kernel code)
    """
    mode = os.environ.get("UNSLOTH_JAX_KERNELS", "").strip().lower()
    if not mode:
        return "pallas" if default_backend() == "gpu" else "reference"
    if mode not in KERNEL_MODES:
        from unsloth_jax.errors import ConfigError

        raise ConfigError(
            f"UNSLOTH_JAX_KERNELS={mode!r} is not one of {KERNEL_MODES}; unset it to use the default."
        )
    return mode


def triton_compiler_params(**kwargs):
    """Compiler params for Pallas' Triton lowering (deprecated but still present in JAX 0.11)."""
    from jax.experimental.pallas import triton as plgpu_triton

    cls = getattr(plgpu_triton, "CompilerParams", None) or getattr(plgpu_triton, "TritonCompilerParams")
    return cls(**kwargs)


def has_host_memory_space() -> bool:
    """True where XLA can offload activations to pinned host memory (GPU/TPU)."""
    return default_backend() in ("gpu", "tpu")


def is_sm90() -> bool:
    """True on an NVIDIA Hopper GPU (compute capability 9.x): where the Mosaic GPU kernels run."""
    try:
        dev = jax.devices()[0]
    except RuntimeError:
        return False
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9.")
