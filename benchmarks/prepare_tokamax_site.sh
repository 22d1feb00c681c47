#!/usr/bin/env bash
# Wheels for tokamax (JAX peer: Mosaic GPU flash attention with a backward) that the offline GPU
# machine lacks, unpacked into a flat site dir to put on PYTHONPATH there; nothing is installed.
# Run on a machine that reaches PyPI:
#   bash benchmarks/prepare_tokamax_site.sh            # -> .bench/.site/tokamax (CPython 3.12)
# then on the device (carry ".bench/.site/tokamax"):
#   PYTHONPATH=$PWD:$PWD/.bench/.site/tokamax python3 benchmarks/bench_attention.py --timing-only \
#       --impls "ours;tokamax mosaic (pre-rotated);cudnn + XLA RoPE"
# The GPU image already has jax/jaxlib, absl-py, jaxtyping, tqdm, protobuf, typing-extensions.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYVER="${PYVER:-3.12}"
SITE="${SITE:-$HERE/.bench/.site/tokamax}"
WHL=$(mktemp -d)
pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$WHL" \
    tokamax einshape pydantic pydantic-core annotated-types typing-inspection qwix \
    typeguard==2.13.3 immutabledict tensorboardx
rm -rf "$SITE" && mkdir -p "$SITE"
for w in "$WHL"/*.whl; do python3 -m zipfile -e "$w" "$SITE"; done
find "$SITE" -name "*_test.py" -delete
# tokamax's benchmarking module imports xprof (a profiler UI, ~100 MB) for one helper that
# attention never calls; a stub module stands in for it.
mkdir -p "$SITE/xprof/cli" && touch "$SITE/xprof/__init__.py" "$SITE/xprof/cli/__init__.py"
echo "get_kernel_stats_tool = None  # stub: see prepare_tokamax_site.sh" > "$SITE/xprof/cli/tools.py"
ls "$WHL" > "$SITE/MANIFEST.txt"
rm -rf "$WHL"
du -sh "$SITE"
