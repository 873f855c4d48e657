#!/usr/bin/env bash
# The first GPU list behind BENCHMARKS.md (its "GPU: training-step speed" table, commit 68d3004), kept to
# rerun it; launch/bench_gpu.sh now measures the speed switches. In priority order, each under its own limit.
#   bash launch/bench_gpu_v1.sh OUTDIR
# Appends one JSON line per measurement to OUTDIR/bench.jsonl (`genscale bench train --out`), and
# writes OUTDIR/train_check.txt: a short Glow training run in fp32 and in bf16 on real digits.
# Run from the repository root; uses `python3 -m launch.cli` so that no install is needed.
set -u
OUT=${1:-bench-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=offline WANDB_SILENT=true
G="python3 -m launch.cli"
J="$OUT/bench.jsonl"
bench() {  # bench LIMIT_S ARGS...: one measurement, cut off at LIMIT_S seconds
  local limit=$1 exp=$2; shift 2
  echo "=== bench $exp $* ($(date +%T))"
  timeout "$limit" $G bench train "$exp" trainer.accelerator=gpu trainer.devices=1 "$@" --out "$J" 2>&1 | grep -E "^\||Error|error:" | tail -4
}
nvidia-smi -L; python3 -c "import torch, deepspeed, lightning; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'lightning', lightning.__version__)"

# The experiments as they were then: eager, NCHW (biggan_imagenet128 and glow_cifar10 now ship compiled)
BIG="biggan_imagenet128 data.batch_size=256 optim.accumulate=1 model.num_classes=1000 trainer.compile=off trainer.channels_last=false"
# 1. BigGAN-128 ch96 batch 256 bf16: Lightning single device, then our DeepSpeed engines, ZeRO 0/1/2
bench 90 $BIG --steps 10 --warmup 3
for z in 0 1 2; do bench 90 $BIG trainer.strategy=deepspeed trainer.zero_stage=$z --steps 10 --warmup 3; done
# 2. Glow CIFAR-10 (K=32, L=3, width 512, affine, LU) at batch 64 and 256, fp32 and bf16
for b in 64 256; do bench 75 glow_cifar10 trainer.compile=off --batch $b --precision 32 bf16-mixed --steps 15 --warmup 3; done
# 3. WGAN-GP DCGAN at 64 px (width 64), fp32 and bf16
bench 60 wgan_gp_mnist5k data.resolution=64 model.g_width=64 model.d_width=64 --batch 64 --precision 32 bf16-mixed --steps 20 --warmup 3
# 4. DeepSpeed fp16 engines (one dynamic loss scaler per network) on BigGAN-128
bench 90 $BIG trainer.strategy=deepspeed trainer.zero_stage=2 --precision 16-mixed --steps 10 --warmup 3
# 5. Glow training on real data, fp32 vs bf16: bits/dim must agree
for p in 32 bf16-mixed; do
  echo "=== train glow_digits $p ($(date +%T))"
  timeout 45 $G train glow_digits trainer.accelerator=gpu trainer.devices=1 trainer.precision=$p trainer.max_iters=600 trainer.log_every=10 \
    trainer.sample_every=0 trainer.progress_bar=false logging.wandb=false logging.root=/tmp/gs_runs logging.run_id=$p \
    trainer.checkpoint.every_n_iters=0 >/dev/null 2>&1
  python3 - "/tmp/gs_runs/glow_digits/$p/metrics.csv" "$p" >> "$OUT/train_check.txt" <<'PY'
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r.get("train/bpd")]
b = [float(r["train/bpd"]) for r in rows]
print(sys.argv[2], "iters", len(b), "first bpd", b[0], "last-20 mean bpd", sum(b[-20:]) / len(b[-20:]))
PY
done
cat "$OUT/train_check.txt"
# 6. BigGAN-128 with torch.compile of G and D (bf16)
bench 150 $BIG --compile --steps 10 --warmup 5
echo "=== done $(date +%T)"
