#!/usr/bin/env bash
# Every GPU check in one call (the lent GPU machine has torch + CUDA, no package index):
#   1. train MobileNetV2 on MNIST + Fashion-MNIST on CUDA with bf16 autocast, record images/s and the card
#   2. export to ONNX and verify against PyTorch (ONNX Runtime CPU there; no TensorRT, no BentoML)
#   3. training throughput: real loop vs synthetic ceiling at 64 px
#   4. the transfer-learning benchmark (docs/results.md)
# Needs .gpu_assets/ (scripts/gpu_assets.sh). Results land in $OUT (or ./gpu-out): 7 files.
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD/.gpu_assets/site:$PWD" TORCH_HOME="$PWD/.gpu_assets/torch" PYTHONUNBUFFERED=1
mkdir -p /usr/share/datasets/fashion-mnist && cp .gpu_assets/fashion-mnist/*.gz /usr/share/datasets/fashion-mnist/
PY=${PY:-python3}
LOG="$OUT/log.txt"
log() { echo "== $* ==" | tee -a "$OUT/summary.md"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__, torch.cuda.get_device_name())' | tee -a "$OUT/gpu.txt"

log "1. train on CUDA (bf16)"
start=$(date +%s)
$PY -m transferkit train --data mnist,fashion-mnist --limit 30000 --image-size 64 --batch-size 512 --epochs 3 \
  --device cuda --out runs/gpu-train 2>> "$LOG" | tail -1
echo "wall time incl. data loading: $(( $(date +%s) - start ))s" | tee -a "$OUT/summary.md"
cp runs/gpu-train/metrics.json "$OUT/train_metrics.json" 2>/dev/null
$PY - <<'PY' 2>&1 | tee -a "$OUT/summary.md"
import json; h = json.load(open("runs/gpu-train/metrics.json"))["history"]
for r in h: print(f"epoch {r['epoch']}: {r['images_per_s']:.0f} img/s, val {r['val_acc']}")
PY

log "2. export ONNX + verify"
$PY - <<'PY' 2>&1 | tail -12 | tee -a "$OUT/summary.md"
from transferkit.export import export_run, format_export_table
r = export_run("runs/gpu-train", formats=["onnx"], store=False)
print(format_export_table(r)); print("ok:", r.ok)
PY
cp runs/gpu-train/export/verify.json "$OUT/verify.json" 2>/dev/null

log "3. throughput"
for bs in 512 1024; do
  $PY benchmarks/train_throughput.py --device cuda --image-size 64 --steps 30 --rounds 3 --limit 20000 \
    --batch-size $bs --out "$OUT/train_throughput.md" 2>>"$LOG" | tail -1 | tee -a "$OUT/summary.md"
done

log "4. transfer benchmark"
timeout 220 $PY benchmarks/transfer.py --device cuda --image-size 48 --limit 10000 --epochs 3 --few-epochs 15 \
  --batch-size 256 --root runs/bench-transfer --out "$OUT/results.md" >> "$LOG" 2>&1
echo "transfer exit $?" | tee -a "$OUT/summary.md"
tail -40 "$OUT/results.md" 2>/dev/null
