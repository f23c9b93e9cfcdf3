#!/usr/bin/env bash
# Every GPU check in one call (the lent GPU machine has torch + CUDA, no package index):
#   tests       the GPU tests (tests/export/test_gpu.py: AOTInductor for CUDA; TensorRT where installed)
#               and the CLI export test, which there runs with a CUDA device present
#   train       1. MobileNetV2 on MNIST + Fashion-MNIST on CUDA with bf16 autocast, images/s and the card
#   export      2. `transferkit export --format onnx,aoti --device cuda`: AOTInductor compiled for the GPU,
#               verified against PyTorch (ONNX Runtime on the CPU there: onnxruntime-gpu is not installed)
#   score       `transferkit score` of 2,000 test PNGs through the CUDA AOTInductor artifact and through
#               ONNX Runtime on the CPU: rows/s of each and their top-1 agreement
#   throughput  3. training throughput: real loop vs synthetic ceiling at 64 px
#   transfer    4. the transfer-learning benchmark (docs/results.md)
# STEPS picks some (default: all, in this order; export and score need train); GPU_DATA the datasets train
# uses (default mnist,fashion-mnist; e.g. fashion-mnist,digits when MNIST does not travel, see gpu_assets.sh). Needs .gpu_assets/
# (scripts/gpu_assets.sh). Results land in $OUT (or ./gpu-out).
set -uo pipefail
STEPS=${STEPS:-tests train export score throughput transfer}
want() { [[ " $STEPS " == *" $1 "* ]]; }
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD/.gpu_assets/site:$PWD" TORCH_HOME="$PWD/.gpu_assets/torch" PYTHONUNBUFFERED=1
mkdir -p /usr/share/datasets/fashion-mnist && cp .gpu_assets/fashion-mnist/*.gz /usr/share/datasets/fashion-mnist/
PY=${PY:-python3}
LOG="$OUT/log.txt"
log() { echo "== $* ==" | tee -a "$OUT/summary.md"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__, torch.cuda.get_device_name())' | tee -a "$OUT/gpu.txt"

if want tests; then
log "0. GPU tests"
$PY -m pytest -q -p no:cacheprovider -rs tests/export/test_gpu.py \
  "tests/test_cli.py::test_export_takes_device_and_verify_images" 2>&1 | tail -15 | tee -a "$OUT/summary.md"
fi

if want train; then
log "1. train on CUDA (bf16)"
start=$(date +%s)
$PY -m transferkit train --data "${GPU_DATA:-mnist,fashion-mnist}" --limit 30000 --image-size 64 --batch-size 512 --epochs 3 \
  --device cuda --out runs/gpu-train 2>> "$LOG" | tail -1
echo "wall time incl. data loading: $(( $(date +%s) - start ))s" | tee -a "$OUT/summary.md"
cp runs/gpu-train/metrics.json "$OUT/train_metrics.json" 2>/dev/null
$PY - <<'PY' 2>&1 | tee -a "$OUT/summary.md"
import json; h = json.load(open("runs/gpu-train/metrics.json"))["history"]
for r in h: print(f"epoch {r['epoch']}: {r['images_per_s']:.0f} img/s, val {r['val_acc']}")
PY

fi

if want export; then
log "2. export ONNX + AOTInductor for CUDA, verify"
$PY -m transferkit export runs/gpu-train --format onnx,aoti --device cuda 2>> "$LOG" | tail -14 \
  | tee -a "$OUT/summary.md"
cp runs/gpu-train/export/verify.json "$OUT/verify.json" 2>/dev/null
fi

if want score; then
log "score: AOTInductor on CUDA vs ONNX Runtime on the CPU, 2,000 test images"
$PY - <<'PY' 2>&1 | tee -a "$OUT/summary.md"
import subprocess, sys, time
from pathlib import Path
import pyarrow.parquet as pq
from PIL import Image
from transferkit.data import load_dataset
from transferkit.preprocess import Preprocessing

folder = Path("runs/gpu-score/images"); folder.mkdir(parents=True, exist_ok=True)
ds = load_dataset("fashion-mnist", Preprocessing(image_size=28), limit=2000)
for i, image in enumerate(ds.test.images[:2000]):
    Image.fromarray(image[..., 0], mode="L").save(folder / f"{i:05d}.png")
tables = {}
for runtime in ("aoti", "onnx"):
    out = Path(f"runs/gpu-score/{runtime}.parquet"); out.unlink(missing_ok=True)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "transferkit", "score", "runs/gpu-train", "--input", str(folder),
                           "--out", str(out), "--runtime", runtime], capture_output=True, text=True)
    took = time.perf_counter() - start
    print(f"{runtime}: exit {proc.returncode}, {took:.1f} s incl. start-up", proc.stderr.strip()[-600:])
    if proc.returncode == 0:
        tables[runtime] = pq.read_table(out).to_pylist()
        print(f"{runtime}: {len(tables[runtime])} rows, {len(tables[runtime]) / took:,.0f} rows/s")
if len(tables) == 2:
    head = "fashion-mnist_labels"
    same = sum(a[head][0] == b[head][0] for a, b in zip(tables["aoti"], tables["onnx"]))
    print(f"top-1 agreement aoti (CUDA) vs onnx (CPU) on column {head}: {same}/{len(tables['aoti'])}")
PY
fi

if want throughput; then
log "3. throughput"
for bs in 512 1024; do
  $PY benchmarks/train_throughput.py --device cuda --image-size 64 --steps 30 --rounds 3 --limit 20000 \
    --batch-size $bs --out "$OUT/train_throughput.md" 2>>"$LOG" | tail -1 | tee -a "$OUT/summary.md"
done

fi

if want transfer; then
log "4. transfer benchmark"
timeout 220 $PY benchmarks/transfer.py --device cuda --image-size 48 --limit 10000 --epochs 3 --few-epochs 15 \
  --batch-size 256 --root runs/bench-transfer --out "$OUT/results.md" >> "$LOG" 2>&1
echo "transfer exit $?" | tee -a "$OUT/summary.md"
tail -40 "$OUT/results.md" 2>/dev/null
fi
