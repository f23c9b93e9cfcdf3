#!/usr/bin/env bash
# A short GPU check of training throughput only (the full check is scripts/gpu_check.sh).
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD/.gpu_assets/site:$PWD" TORCH_HOME="$PWD/.gpu_assets/torch" PYTHONUNBUFFERED=1
mkdir -p /usr/share/datasets/fashion-mnist && cp .gpu_assets/fashion-mnist/*.gz /usr/share/datasets/fashion-mnist/
for bs in ${BATCHES:-512 1024}; do
  python3 benchmarks/train_throughput.py --device cuda --image-size 64 --steps 30 --rounds 3 --limit 10000 \
    --batch-size "$bs" --out "$OUT/train_throughput.md" 2>>"$OUT/log.txt" | tail -1
done
