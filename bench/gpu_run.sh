#!/usr/bin/env bash
# The GPU checks, in three commands for a machine with a CUDA GPU and CuPy (for example
# the sandbox's device tool, which runs one command at a time on a copy of this tree).
# Run them back to back, so that CuPy's compiled kernels (~/.cupy) are reused:
#   bash bench/gpu_run.sh tests    # environment + the CuPy test suite (stops itself at 540 s)
#   bash bench/gpu_run.sh demo     # minilora demo --device cuda, then lesson 6
#   bash bench/gpu_run.sh bench    # bench/run.py: its GPU part (tiny..medium, GPT-2 small) + tiny CPU
# What each prints also lands in $OUT/<mode>.log (default OUT=/tmp/out); the benchmark's
# .md/.json land in $OUT: copy them to bench/results/ and quote them in README.md.
# A machine without network access and without tqdm or matplotlib needs wheels for its
# Python brought along in .device/wheels (e.g. `pip download --no-deps -d .device/wheels
# tqdm`, with .device ignored by git and carried); the environment block says what is missing.
set -u
mode=${1:-tests}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
exec > >(tee -a "$OUT/$mode.log") 2>&1

echo "== environment ($mode)"
python -V
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
python - <<'EOF'
import importlib
for m in ("numpy", "cupy", "torch", "tokenizers", "safetensors", "tqdm", "matplotlib", "pytest", "hypothesis"):
    try:
        print(f"{m:12s} {getattr(importlib.import_module(m), '__version__', '?')}")
    except Exception as e:  # noqa: BLE001
        print(f"{m:12s} MISSING ({e})")
EOF
for m in tqdm matplotlib; do
    python -c "import $m" 2>/dev/null && continue
    if ls .device/wheels/"$m"-*.whl >/dev/null 2>&1; then
        pip install -q --no-index --find-links .device/wheels "$m"
    else
        echo "$m missing and no wheel for it in .device/wheels: minilora needs tqdm; the demo's plot and lesson 6 need matplotlib"
    fi
done
python -c "import minilora, cupy; print('cuda_available', minilora.cuda_available(), cupy.cuda.runtime.getDeviceCount())"

case "$mode" in
tests)
    echo "== pytest --backend cupy"
    time timeout 540 python -m pytest -q --backend cupy -p no:cacheprovider --durations=15 2>&1 | tail -60
    ;;
demo)
    echo "== minilora demo --device cuda"
    time timeout 300 python -m minilora demo --device cuda --out /tmp/demo_cuda --quiet 2>&1 | tail -60
    cp /tmp/demo_cuda/results.json "$OUT/demo_cuda_results.json" 2>/dev/null || true
    echo "== lesson 6"
    time timeout 240 python tutorials/06_gpu_with_cupy.py 2>&1 | tail -60
    ;;
bench)
    echo "== bench/run.py (GPU part; tiny CPU part beside it)"
    time timeout 570 python bench/run.py --configs tiny --no-memory --no-allocator --out "$OUT" 2>&1 | tail -150
    ;;
*)
    echo "unknown mode $mode (tests, demo, bench)"; exit 2 ;;
esac
