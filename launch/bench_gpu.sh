#!/usr/bin/env bash
# Issue 10's speed switches, each measured on and off on the same card in the same run.
#   bash launch/bench_gpu.sh OUTDIR [BUDGET_S]
#   CHECK=1 bash launch/bench_gpu.sh OUTDIR   (no GPU needed: every bench command's arguments and configs are
#                                              checked, `genscale bench train|memory --check`; nothing is timed)
# Rows marked P also run 2 iterations under torch.profiler after their timed ones (`--profile 2`,
# trainer/bench_profile.py): the GPU's busy share of the step, kernels per iteration, time by kind
# of kernel and the costliest kernels, in bench.log and in each JSON row's `profile`.
# The largest batch per GPU (`genscale bench memory`) in OUTDIR/memory.jsonl, with every probe's row.
# One JSON line per measurement in OUTDIR/bench.jsonl (`genscale bench train --out`; each row records
# its `variant` overrides and the switches: compile_mode, channels_last, optimizer_impl, cudnn_benchmark),
# the tables in OUTDIR/bench.log, every command's whole output in OUTDIR/bench_raw.log and the GPU tests'
# in OUTDIR/gpu_tests.log. Run from the repository root; `python3 -m launch.cli` needs no install.
# On the lent GPU machines (torch, Triton and Lightning present, no package index), what genscale needs
# besides travels as wheels: here, `python3 -m pip download --no-deps --only-binary=:all: --python-version
# 3.12 --implementation cp --platform manylinux2014_x86_64 -d .whl hjson==3.1.0
# omegaconf==2.4.0 mlxtend==0.25.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0
# typing_inspection==0.4.5` (DeepSpeed has no wheel on the index; build one with `python3 -m pip wheel --no-deps
# -w .whl deepspeed==0.19.8`, pure Python; .whl is git-ignored; the set of 2026-11-26), then one device call with
# carry [".whl", ".compile_cache"] and timeout_s 595: `python3 -m pip install -q --no-index --no-deps
# --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site ||
# exit; export GENSCALE_COMMIT=<sha>; bash launch/bench_gpu.sh $OUT 520`. Afterwards, keep the returned
# compile cache for the next session: `rm -rf .compile_cache && mkdir .compile_cache && cp
# FILES_AT/compile_cache.*.tar.xz .compile_cache/` (git-ignored; a missing folder just means no cache).
#
# Time: the measurements stay within BUDGET_S seconds (default 540 = 9 minutes, of a 15-minute device
# allowance that also pays for the machine's start); packing the compile cache after them takes at most
# 40 s more. Each command runs under its own limit, cut to what
# is left of the budget; a command with under 25 s left is skipped and says so. Output goes to files,
# not pipes: a timed-out compile leaves inductor's worker processes behind, and they held a pipe open
# until the device call's own limit (run of f2ef648). Times on an H100 at f2ef648 (BENCHMARKS.md):
# BigGAN eager, 4 variants: 92 s; BigGAN compiled: 154 s; Glow eager, 6 rows: 64 s; PGAN eager, 4
# rows: 67 s; tests/gpu: 51 s; Glow reduce-overhead at batch 64: under 185 s (batch 256 did not finish).
#
# Baseline = the training path as it was before these switches: cuDNN autotuning off (torch's default,
# which Lightning left alone), foreach Adam/Adamax (torch's CUDA default), NCHW, eager. The host-sync
# removal (trainer/counters.py) has no switch and is in every row. Several variants share one process,
# so the allocator runs with expandable segments: at f2ef648 the second BigGAN variant found 36 GB
# reserved but fragmented and ran out of memory.
set -u
OUT=${1:-bench-out}
BUDGET=${2:-540}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=offline WANDB_SILENT=true PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
G=${GENSCALE_CMD:-python3 -m launch.cli}  # (tests put a recorder of the arguments here)
J="$OUT/bench.jsonl"
LOG="$OUT/bench.log"
RAW="$OUT/bench_raw.log"
touch "$RAW"
limit_for() {  # limit_for WANTED_S: WANTED_S cut to what is left of the budget; 0 if under 25 s are left
  local left=$((BUDGET - SECONDS)) want=$1
  if [ "$left" -lt 25 ]; then echo 0; elif [ "$want" -gt "$left" ]; then echo "$left"; else echo "$want"; fi
}
run_bench() {  # run_bench SUB OUTFILE LIMIT_S EXPERIMENT ARGS...: one `genscale bench SUB` process
  local sub=$1 out=$2 limit exp=$4 from; limit=$(limit_for "$3"); shift 4
  if [ "$limit" -eq 0 ]; then
    echo "=== SKIPPED (budget of ${BUDGET}s spent): bench $sub $exp $*" | tee -a "$LOG"; return
  fi
  echo "=== bench $sub $exp $* (limit ${limit}s, at ${SECONDS}s, $(date +%T))" | tee -a "$LOG" "$RAW"
  from=$(wc -l < "$RAW")
  timeout -k 10 "$limit" $G bench "$sub" "$exp" trainer.accelerator=gpu trainer.devices=1 "$@" --out "$out" \
    ${CHECK:+--check} >> "$RAW" 2>&1
  local rc=$?
  tail -n +$((from + 1)) "$RAW" | grep -E "^\||^ok: |^profile |^  |^probe |largest batch|no batch fits|Error|Exception|error:|out of memory" \
    | tee -a "$LOG" | tail -16
  echo "=== exit $rc at ${SECONDS}s" | tee -a "$LOG"
}
bench() { run_bench train "$J" "$@"; }  # bench LIMIT_S EXPERIMENT ARGS...: rows appended to $J as measured
memory() { run_bench memory "$OUT/memory.jsonl" "$@"; }  # the largest batch per GPU: one process per probe
[ -n "${CHECK:-}" ] || nvidia-smi -L | tee -a "$LOG"
# torch.compile's caches from the last lent machine, if carried (launch/compile_cache.py): compiles that
# took minutes at f2ef648 become loads; every row's compile_cache field and "(cached)" say which did.
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/genscale_inductor}
python3 -m launch.compile_cache unpack "$TORCHINDUCTOR_CACHE_DIR" "${COMPILE_CACHE_FROM:-.compile_cache}" >> "$LOG" 2>&1
tail -n 3 "$LOG"
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)" | tee -a "$LOG"

EAGER="trainer.compile=off trainer.channels_last=false"   # biggan_imagenet128 ships with both on
OLD="$EAGER trainer.cudnn_benchmark=false optim.g.impl=foreach optim.d.impl=foreach"   # before the switches
FOREACH="$EAGER optim.g.impl=foreach optim.d.impl=foreach"
BIG="biggan_imagenet128 data.batch_size=256 optim.accumulate=1 model.num_classes=1000"
PG="pgan_celebahq1024 data.resolution=256 pgan.fade_images=[1] pgan.stable_images=[1] pgan.batch_sizes=[]"
# In priority order: what this commit changed and what earlier runs left unknown (measured rows are
# in BENCHMARKS.md).

gpu_tests() {  # gpu_tests LIMIT_S PYTEST_K: the -m gpu tests that -k selects, their output appended to gpu_tests.log
  local limit from; limit=$(limit_for "$1")
  if [ -n "${CHECK:-}" ]; then
    echo "=== SKIPPED (CHECK): tests/gpu -k '$2'" | tee -a "$LOG"
  elif [ "$limit" -gt 0 ]; then
    echo "=== pytest -m gpu tests/gpu -k '$2' (limit ${limit}s, at ${SECONDS}s)" | tee -a "$LOG" "$OUT/gpu_tests.log"
    from=$(wc -l < "$OUT/gpu_tests.log")
    timeout -k 10 "$limit" python3 -m pytest -q -p no:cacheprovider -rA -m gpu tests/gpu -k "$2" >> "$OUT/gpu_tests.log" 2>&1
    tail -n +$((from + 1)) "$OUT/gpu_tests.log" | grep -E "^(PASSED|FAILED|ERROR)|passed|failed|skipped|^E " | tail -30 \
      | tee -a "$LOG"  # this group's results only
  else
    echo "=== SKIPPED (budget of ${BUDGET}s spent): tests/gpu -k '$2'" | tee -a "$LOG"
  fi
}
SLOW_GPU_TESTS="largest_batch_under_a_memory_cap or compiled_per_step_with_cuda_graphs"

# 1. The GPU tests (tests/gpu: bf16 against fp32, finite bf16 iterations, one fp16 scaler per network, Glow fused
#    against separate layers (values, gradients, peak memory), PGAN's fused resampling convolutions (images,
#    D's peak memory), device syncs per step as CUDA reports them, the switches against the plain path, the fused attention
#    kernel at BigGAN-128's sizes, the profile's CUDA kernel records; 45 s at f2ef648, when the gan_digits sync
#    count failed, text lost). The two slow ones (about 5 probe processes under a 1.5 GB allocator cap; Glow
#    compiled per step under CUDA graphs against eager) run in step 7, so the measurements come first.
gpu_tests 120 "not ($SLOW_GPU_TESTS)"

# 2. The largest BigGAN-128 batch per GPU (issue 10 asks for it; never measured): `genscale bench memory`,
#    a fresh process per probed batch (bf16, eager, fused attention: batch 256 took 47.5 GB at f2ef648),
#    from 256 in multiples of 32, each next probe where a line through the measured memory reaches the card
#    (doubling and bisection as a fallback): 3-5 probes of 10-20 s
memory 120 $BIG model.attention_impl=sdpa --precision bf16-mixed --no-compile --start 256 --multiple 32 --max 2048

# 3. Glow CIFAR-10 (K=32, L=3, width 512, affine, LU, Adamax), eager: ActNorm and the zero convs' scales
#    as separate layers (flow.fused=false, the arithmetic of every earlier Glow row: 303 / 846 img/s fp32
#    at batch 64 / 256 at f2ef648) against folded into the convolutions (flow.fused, half the fp32
#    activation memory, a fifth of it in bf16); fp32 at 64 and 256 (bf16 at 256: step 7)
bench 90 glow_cifar10 --batch 64 256 --precision 32 --steps 12 --warmup 3 --profile 2 \
  --variant "trainer.compile=off flow.fused=false" --variant "trainer.compile=off"  # P

# 4. BigGAN-128 ch96 bf16 batch 256 (1 D + 1 G step), eager, channels_last: self-attention as explicit
#    matmuls (the (hw x hw/4) map materialised, its softmax in fp32 under autocast) against the fused
#    F.scaled_dot_product_attention (model.attention_impl=sdpa)
bench 90 $BIG --steps 8 --warmup 2 --profile 2 --variant "trainer.compile=off" \
  --variant "trainer.compile=off model.attention_impl=sdpa"  # P

# 5. Progressive GAN grown to 256 px (the paper's network), timed in the 256 px stable phase: phases of
#    1 image put every step after the first at 256 px, alpha 1, so FLOPs are counted at 256 px too.
#    WGAN-GP, bf16, batch 16, eager: resampling and convolutions separate (pgan.fused_scale=false, as at
#    f2ef648: 54.1 img/s), folded into one strided / transposed conv (pgan.fused_scale, 0.65x the FLOPs),
#    then also the penalty's critic in bf16 instead of fp32 (loss.gp_autocast, as a step wrapped whole in
#    autocast runs it; the reference's bf16 row: 59 img/s), and the second row with the finite-loss check
#    on the host (trainer.finite_check=host: 2 syncs per iteration; the rows above decide it on the
#    device in the fused Adam, with none). Then the compiled rows, which cost minutes of
#    compiling unless the carried cache has them (so they come after every eager row): BigGAN with sdpa as
#    shipped (against 737 img/s with matmul at f2ef648), and PGAN's compiled G, D and gradient penalty
#    (one graph with its double backward; at f2ef648 the penalty ran D eagerly)
bench 80 $PG --batch 16 --precision bf16-mixed --steps 8 --warmup 3 --profile 2 \
  --variant "trainer.compile=off pgan.fused_scale=false" --variant "trainer.compile=off" \
  --variant "trainer.compile=off loss.gp_autocast=true" --variant "trainer.compile=off trainer.finite_check=host"  # P
bench 200 $BIG model.attention_impl=sdpa --steps 8 --warmup 4 --profile 2  # P
bench 150 $PG --batch 16 --precision bf16-mixed --steps 8 --warmup 3 --profile 2 \
  --variant "trainer.channels_last=true trainer.compile=default"  # P

# 6. Glow CIFAR-10 fp32 with CUDA graphs (the experiment's compile reduce-overhead) compiled per flow step
#    (trainer.compile_scope=block: a few small graphs instead of one of 96 steps; the whole-flow compile at
#    batch 256 did not finish within its limit at f2ef648), at batch 64 and 256, fp32 and bf16 (eager bf16
#    lost to fp32 at f2ef648 on its extra cast kernels, which graphs and fusion remove); warmup_s in each
#    row is the compile's cost.
bench 180 glow_cifar10 trainer.compile_scope=block --batch 64 256 --precision 32 bf16-mixed --steps 15 --warmup 5 \
  --profile 2  # P

# 7. If time is left: the two slow GPU tests; Glow eager bf16 at batch 256, fused on and off; PGAN compiled with the penalty in bf16; Glow CIFAR-10 fp32 as shipped (CUDA graphs,
#    compile reduce-overhead of the whole flow; now with flow.fused) at batch 64 (815 img/s at f2ef648) and 256; BigGAN
#    baseline and cuDNN autotuning alone (the row that ran out of
#    memory at f2ef648); Glow graphs in bf16; PGAN compiled at batch 64; PGAN with CUDA graphs at batch 16
#    (many small kernels at its low resolutions); the largest BigGAN batch
#    as shipped (compiled, so each probe compiles)
gpu_tests 150 "$SLOW_GPU_TESTS"
bench 60 glow_cifar10 --batch 256 --precision bf16-mixed --steps 12 --warmup 3 --variant "trainer.compile=off flow.fused=false" \
  --variant "trainer.compile=off"
bench 150 $PG --batch 16 --precision bf16-mixed --steps 8 --warmup 3 \
  --variant "trainer.channels_last=true trainer.compile=default loss.gp_autocast=true"
bench 150 glow_cifar10 --batch 64 --precision 32 --steps 15 --warmup 5 --profile 2  # P
bench 150 glow_cifar10 --batch 256 --precision 32 --steps 15 --warmup 5 --profile 2  # P
bench 90 $BIG --steps 8 --warmup 2 --variant "$OLD" --variant "$FOREACH"
bench 150 glow_cifar10 --batch 64 --precision bf16-mixed --steps 15 --warmup 5
bench 120 $PG --batch 64 --precision bf16-mixed --steps 8 --warmup 3 --variant "trainer.channels_last=true trainer.compile=default"
bench 150 $PG --batch 16 --precision bf16-mixed --steps 8 --warmup 3 --profile 2 \
  --variant "trainer.channels_last=true trainer.compile=reduce-overhead"  # P: CUDA graphs at batch 16
memory 150 $BIG --precision bf16-mixed --start 256 --multiple 32 --max 2048  # as shipped: compiled
# Glow at batch 64 ran at 20x its floors (BENCHMARKS.md, "targets against their floors"), in many small
# convolutions: inductor's max-autotune benchmarks Triton templates against cuDNN for each of them. Its compile is long, so
# it comes last; what it tunes is packed into the compile cache, so the next session picks up from there.
bench 240 glow_cifar10 trainer.compile_scope=block trainer.compile=max-autotune --batch 64 --precision 32 \
  --steps 15 --warmup 5 --profile 2  # P
echo "=== done at ${SECONDS}s ($(date +%T))" | tee -a "$LOG"
# For the next session: the caches as at most 3 parts of 15 MiB (with the 5 files above, the 8 files of
# 16 MiB a device call returns), to be carried as .compile_cache/ (the header's command). Outside the budget.
timeout -k 5 40 python3 -m launch.compile_cache pack "$TORCHINDUCTOR_CACHE_DIR" "$OUT/compile_cache" >> "$LOG" 2>&1
tail -n 2 "$LOG"
