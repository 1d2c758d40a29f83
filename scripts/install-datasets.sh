#!/usr/bin/env bash
# Install Fashion-MNIST from Debian (package dataset-fashion-mnist: four IDX files under
# /usr/share/datasets/fashion-mnist) when it is missing and we may use apt-get. Never fails the setup:
# without it, searchsvc falls back to dataset.root or a torchvision download.
set -u
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Fashion-MNIST from Debian (dataset-fashion-mnist)"
    { apt-get install -y -q dataset-fashion-mnist || { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; }; } \
        >/tmp/searchsvc-apt.log 2>&1 || echo "note: could not install dataset-fashion-mnist (see /tmp/searchsvc-apt.log)"
else
    echo "note: Fashion-MNIST not found; run 'sudo apt-get install dataset-fashion-mnist' or set dataset.root"
fi
exit 0
