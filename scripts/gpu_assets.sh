#!/usr/bin/env bash
# Bundle the offline assets for a GPU machine that has torch but no package index: the ImageNet weights
# (torch hub cache layout), MNIST (as the `mnist` package layout) and Fashion-MNIST, into .gpu_assets/.
set -euo pipefail
PY=${1:-.venv/bin/python}
dst=.gpu_assets
mkdir -p "$dst/torch/hub/checkpoints" "$dst/site/mnist/data" "$dst/fashion-mnist"
cp -u "${TORCH_HOME:-$HOME/.cache/torch}/hub/checkpoints/mobilenet_v2-b0353104.pth" "$dst/torch/hub/checkpoints/"
# GPU_DATA (as for gpu_check.sh) without mnist leaves MNIST's 17 MB out: the tree a device call carries is capped
if [[ ",${GPU_DATA:-mnist,fashion-mnist}," == *",mnist,"* ]]; then
  mnist=$("$PY" -c 'import importlib.resources as r; print(r.files("mnist") / "data" / "mnist.pkl.gz")')
  cp -u "$mnist" "$dst/site/mnist/data/"
  touch "$dst/site/mnist/__init__.py"
fi
cp -u /usr/share/datasets/fashion-mnist/*.gz "$dst/fashion-mnist/"
du -sh "$dst"
