#!/usr/bin/env bash
# JAX 0.11 on the CPU dev machine, for lowering tests before a device call.
#
# The device runs JAX 0.11.x, which needs Python >= 3.12; the dev machine has Debian bookworm's 3.11
# and JAX 0.10.2. JAX 0.11 lowers Mosaic GPU kernels through the Mosaic GPU dialect (0.10 builds
# fragmented arrays directly), so a kernel that lowers on 0.10 can still fail on 0.11: this puts a
# Debian trixie chroot (Python 3.13) with jax/jaxlib 0.11.2 under /opt/trixie and runs pytest in it
# over this checkout, so `lower(lowering_platforms=("cuda",))` tests and the interpreter run on 0.11
# without a GPU. Needs root and the Debian / PyPI registries; ~1 min the first time.
# Not covered there: Triton lowering (JAX 0.11 asks for a GPU device to lower a Triton pallas_call,
# "No supported GPU devices found") and the torch / peft / bitsandbytes parity tests (not installed).
#
#   bash benchmarks/jax011_env.sh tests/test_attention_mosaic_dkv.py -k lowers   # any pytest args
set -euo pipefail
ROOT=${JAX011_ROOT:-/opt/trixie}
REPO=$(cd "$(dirname "$0")/.." && pwd)
JAX_VERSION=${JAX011_VERSION:-0.11.2}

if [ ! -x "$ROOT/opt/v/bin/python" ]; then
    command -v debootstrap >/dev/null || apt-get install -y -q debootstrap
    [ -d "$ROOT/usr" ] || debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        trixie "$ROOT" http://deb.debian.org/debian
    cp /etc/resolv.conf "$ROOT/etc/"
    chroot "$ROOT" python3 -m venv /opt/v
    chroot "$ROOT" /opt/v/bin/pip install -q "jax==$JAX_VERSION" "jaxlib==$JAX_VERSION" flax optax chex \
        einops pyyaml pytest pytest-xdist
fi
mkdir -p "$ROOT/work"
mountpoint -q "$ROOT/work" || mount --bind "$(dirname "$REPO")" "$ROOT/work"
mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
REL=/work/$(basename "$REPO")
exec chroot "$ROOT" bash -c "cd $REL && PYTHONPATH=$REL /opt/v/bin/python -m pytest -p no:cacheprovider $(printf '%q ' "$@")"
