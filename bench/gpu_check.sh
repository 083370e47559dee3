#!/usr/bin/env bash
# The GPU check in one command, for a lent device machine (a bare image: PyTorch, transformers,
# scipy and pytest, no Ray or DeepSpeed). From the development machine:
#   run(command="bash bench/gpu_check.sh", timeout_s=580)
# 1. the suite's device tests on the GPU (pytest --device cuda: model, prompts, CDN, objective,
#    GRQO step, generators on the batch's device);
# 2. the SFT and GRQO steps of -T (swin-t) at 800x1333 in bf16: step times, GRQO / SFT, images/s,
#    MFU, peak memory (dinor1/bench/objective_steps.py);
# 3. the same with 300 boxes per image (dense data: the step's memory bounded);
# 4. torch.compile against eager (skipped with GPU_CHECK_COMPILE=0; it takes ~5 minutes).
# Either it runs end to end or it says in one line what is missing. Output under $OUT (what
# comes back from the device machine) or /tmp/gpu_check.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1 TRANSFORMERS_DISABLE_TORCH_CHECK=1
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
python=${PYTHON:-python3}

# what this needs, said in one line when absent
missing=$("$python" - <<'EOF'
import importlib
missing = []
for name in ("torch", "transformers", "scipy", "safetensors", "numpy", "PIL", "pytest"):
    try:
        importlib.import_module(name)
    except Exception:
        missing.append(name)
if "transformers" not in missing:
    import transformers
    if int(transformers.__version__.split(".")[0]) < 5:
        missing.append(f"transformers>=5 (found {transformers.__version__})")
if "torch" not in missing:
    import torch
    if not torch.cuda.is_available():
        missing.append("a CUDA device (torch.cuda.is_available() is false)")
print(", ".join(missing))
EOF
)
if [[ -n "$missing" ]]; then
    echo "gpu_check: missing: $missing" >&2
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
"$python" -c "import torch, transformers; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"

failed=()
stage() {  # stage NAME TIMEOUT_S COMMAND...: run, keep its output, note a failure, go on
    local name=$1 limit=$2
    shift 2
    echo "== $name"
    if ! timeout "$limit" "$@" > >(tee "$out/$name.txt") 2>&1; then
        failed+=("$name")
    fi
}
shape=(--preset swin-t --height 800 --width 1333 --batch-size 4 --device cuda --bf16)
# (-o addopts: no pytest-xdist on a bare GPU machine, and one process for one GPU)
stage tests 150 "$python" -m pytest -q -p no:cacheprovider -o addopts="-ra --strict-markers" \
  --device cuda tests/model tests/objectives
stage objective_steps 150 "$python" -m dinor1.bench.objective_steps "${shape[@]}" --steps 10 --warmup 3
stage dense_300_boxes 90 "$python" -m dinor1.bench.objective_steps "${shape[@]}" --objects 300 \
    --steps 3 --warmup 1
if [[ "${GPU_CHECK_COMPILE:-1}" != 0 ]]; then
    stage compile 300 "$python" -m dinor1.bench.objective_steps "${shape[@]}" --steps 5 --warmup 2 \
        --compare compile
fi
if (( ${#failed[@]} )); then
    echo "gpu_check: FAILED: ${failed[*]} (outputs in $out)" >&2
    exit 1
fi
echo "gpu_check: all stages passed (outputs in $out)"
