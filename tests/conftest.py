import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA's CPU thread pool size. The Mosaic GPU interpreter runs a kernel's three warpgroups as
# three threads blocked in host callbacks: with the default pool of one thread per core (2 in
# CI) the third never starts (tests/test_attention_mosaic.py).
os.environ.setdefault("NPROC", "8")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
