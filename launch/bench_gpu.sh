#!/usr/bin/env bash
# Issue 10's speed switches, each measured on and off on the same card in the same run.
#   bash launch/bench_gpu.sh OUTDIR [BUDGET_S]
# One JSON line per measurement in OUTDIR/bench.jsonl (`genscale bench train --out`; each row records
# its `variant` overrides and the switches: compile_mode, channels_last, optimizer_impl, cudnn_benchmark),
# the console tables and the GPU tests' result in OUTDIR/bench.log. Run from the repository root; `python3 -m launch.cli` needs no install.
#
# Time: the whole script stays within BUDGET_S seconds (default 540 = 9 minutes, of a 15-minute device
# allowance that also pays for the machine's start). Each command runs under its own limit, cut to what
# is left of the budget; a command with under 25 s left is skipped and says so. The commands are in
# priority order, the least certain (compiling Glow's 96 flow steps) last; it gets what the others leave
# (their limits sum to 510 s). Guesses, not measurements: BigGAN eager ~30 s per variant (building the
# 158M-parameter networks, the FLOP-count iteration, cuDNN autotuning, 10 iterations), BigGAN compiled
# ~140 s (the earlier compiled row fitted in 150 s), Glow eager ~12 s per row, PGAN ~15 s per row.
#
# Baseline = the training path as it was before these switches: cuDNN autotuning off (torch's default,
# which Lightning left alone), foreach Adam/Adamax (torch's CUDA default), NCHW, eager. The host-sync
# removal (trainer/counters.py) has no switch and is in every row; the rows of BENCHMARKS.md's first
# GPU table (commit 68d3004, launch/bench_gpu_v1.sh) are the before for it, on another H100 session.
set -u
OUT=${1:-bench-out}
BUDGET=${2:-540}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=offline WANDB_SILENT=true
G="python3 -m launch.cli"
J="$OUT/bench.jsonl"
LOG="$OUT/bench.log"
bench() {  # bench LIMIT_S EXPERIMENT ARGS...: one process, its rows appended to $J as they are measured
  local limit=$1 exp=$2; shift 2
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 25 ]; then
    echo "=== SKIPPED (budget of ${BUDGET}s spent): bench $exp $*" | tee -a "$LOG"; return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== bench $exp $* (limit ${limit}s, at ${SECONDS}s, $(date +%T))" | tee -a "$LOG"
  timeout "$limit" $G bench train "$exp" trainer.accelerator=gpu trainer.devices=1 "$@" --out "$J" 2>&1 \
    | grep -E "^\||Error|error:|out of memory" | tee -a "$LOG" | tail -12
  echo "=== exit ${PIPESTATUS[0]} at ${SECONDS}s" | tee -a "$LOG"
}
nvidia-smi -L | tee -a "$LOG"
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)" | tee -a "$LOG"

OLD="trainer.cudnn_benchmark=false optim.g.impl=foreach optim.d.impl=foreach"   # the path before the switches
FOREACH="optim.g.impl=foreach optim.d.impl=foreach"

# 1. BigGAN-128 ch96 bf16 batch 256 (1 D + 1 G step): baseline, +cuDNN autotuning, +channels_last,
#    +fused Adam (impl auto = fused on CUDA), in one process
BIG="biggan_imagenet128 data.batch_size=256 optim.accumulate=1 model.num_classes=1000"
bench 150 $BIG --steps 8 --warmup 2 --variant "$OLD" --variant "$FOREACH" \
  --variant "$FOREACH trainer.channels_last=true" --variant "trainer.channels_last=true"
# 2. ... +torch.compile of G and D (all of the above on)
bench 170 $BIG trainer.channels_last=true trainer.compile=default --steps 8 --warmup 4

# 3. Glow CIFAR-10 (K=32, L=3, width 512, affine, LU, Adamax: no fused kernel) fp32 at batch 64 and 256:
#    baseline, +cuDNN autotuning, +channels_last
OLDF="trainer.cudnn_benchmark=false flow.optimizer_impl=foreach"
bench 100 glow_cifar10 --batch 64 256 --precision 32 --steps 12 --warmup 3 \
  --variant "$OLDF" --variant "flow.optimizer_impl=foreach" --variant "trainer.channels_last=true"

# 4. Progressive GAN grown to 256 px (the paper's network), timed in the 256 px stable phase: phases of
#    1 image put every step after the first at 256 px, alpha 1, so FLOPs are counted at 256 px too.
#    WGAN-GP, bf16 (the reference's faster row), batch 16 and 64 (64 did not fit the reference in
#    80 GB; out of memory is recorded as a row): baseline and all switches
PG="pgan_celebahq1024 data.resolution=256 pgan.fade_images=[1] pgan.stable_images=[1] pgan.batch_sizes=[]"
bench 90 $PG --batch 16 64 --precision bf16-mixed --steps 8 --warmup 3 --variant "$OLD" --variant "trainer.channels_last=true"

# 5. The GPU tests (tests/gpu: bf16 against fp32, finite bf16 iterations, one fp16 scaler per network,
#    device syncs per step as CUDA reports them, the switches against the plain path; ~50 s)
left=$((BUDGET - SECONDS)); [ "$left" -gt 100 ] && left=100
if [ "$left" -ge 25 ]; then
  echo "=== pytest -m gpu tests/gpu (limit ${left}s, at ${SECONDS}s)" | tee -a "$LOG"
  timeout "$left" python3 -m pytest -q -p no:cacheprovider -rA -m gpu tests/gpu 2>&1 | tail -40 | tee -a "$LOG"
else
  echo "=== SKIPPED (budget of ${BUDGET}s spent): tests/gpu" | tee -a "$LOG"
fi

# 6. Glow with torch.compile mode reduce-overhead (CUDA graphs), batch 64 then 256: what is left
bench 240 glow_cifar10 --batch 64 256 --precision 32 --steps 15 --warmup 5 --variant "trainer.compile=reduce-overhead"
echo "=== done at ${SECONDS}s ($(date +%T))" | tee -a "$LOG"
