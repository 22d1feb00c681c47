import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA's CPU thread pool size. The Mosaic GPU interpreter runs a kernel's three warpgroups as
# three threads blocked in host callbacks: with the default pool of one thread per core (2 in
# CI) the third never starts (tests/test_attention_mosaic.py).
os.environ.setdefault("NPROC", "8")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
sys.path.insert(0, os.path.dirname(__file__))

import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def _compilation_cache_dir():
    """One persistent compilation cache per test run, shared by its xdist workers: many tests build
    the same tiny models and train steps, and XLA's CPU compile is most of their time (the trainer
    and train-step tests: 4.2 -> 3.5-3.75 min on 2 cores). Runs older than a day are removed."""
    root = os.path.join(tempfile.gettempdir(), "unsloth_jax_tests")
    if os.path.isdir(root):
        for old in os.listdir(root):
            path = os.path.join(root, old)
            if time.time() - os.path.getmtime(path) > 86400:
                shutil.rmtree(path, ignore_errors=True)
    return os.path.join(root, os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid()))


jax.config.update("jax_compilation_cache_dir", _compilation_cache_dir())
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
