#!/usr/bin/env bash
# The GPU figures of the performance issue in one command, for a lent device machine (a bare
# image with PyTorch and transformers: no Ray or DeepSpeed there, so this times the real SFT and
# GRQO steps on one GPU without them; see dinor1/bench/objective_steps.py). From this machine:
#   run(command="bash bench/gpu_check.sh", timeout_s=560)
# Writes its output under $OUT (what comes back) or /tmp/gpu_check.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$out/gpu.txt"
shape=(--preset swin-t --height 800 --width 1333 --batch-size 4 --device cuda --bf16)
# -T at 800x1333, bf16 autocast: SFT and GRQO step times, GRQO / SFT, images/s, MFU
timeout 200 python3 -m dinor1.bench.objective_steps "${shape[@]}" --steps 10 --warmup 3 \
    2>&1 | tee "$out/objective_steps.txt"
# the same steps with torch.compile (it compiles inside the warm-up; eager is timed again)
timeout 320 python3 -m dinor1.bench.objective_steps "${shape[@]}" --steps 5 --warmup 2 \
    --compare compile 2>&1 | grep -v "^W[0-9]" | tail -30 | tee "$out/compile.txt"
