#!/usr/bin/env bash
# Make sure the Fashion-MNIST IDX files (Debian package dataset-fashion-mnist) are on this machine.
#
# Looks in $PRANCE_FASHION_MNIST_DIR if set (an explicit choice is never second-guessed), else where
# dpkg installed the package, else its default folder. When they are missing: installs the package
# when running as root, otherwise prints the command to run and exits 1.
set -euo pipefail

PKG=dataset-fashion-mnist
DEFAULT_DIR=/usr/share/datasets/fashion-mnist
FILES=(train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte)

has_files() {
    local dir=$1 f
    for f in "${FILES[@]}"; do
        [[ -f "$dir/$f.gz" || -f "$dir/$f" ]] || return 1
    done
}

package_dir() {
    local listed
    if command -v dpkg >/dev/null 2>&1 && listed=$(dpkg -L "$PKG" 2>/dev/null); then
        listed=$(grep -m1 '/train-images-idx3-ubyte\.gz$' <<<"$listed" || true)
        if [[ -n "$listed" ]]; then
            dirname "$listed"
            return
        fi
    fi
    echo "$DEFAULT_DIR"
}

if [[ -n "${PRANCE_FASHION_MNIST_DIR:-}" ]]; then
    if has_files "$PRANCE_FASHION_MNIST_DIR"; then
        echo "Fashion-MNIST: $PRANCE_FASHION_MNIST_DIR"
        exit 0
    fi
    echo "Fashion-MNIST IDX files not found in PRANCE_FASHION_MNIST_DIR=$PRANCE_FASHION_MNIST_DIR; fix or unset it" >&2
    exit 1
fi

dir=$(package_dir)
if has_files "$dir"; then
    echo "Fashion-MNIST: $dir"
    exit 0
fi

if [[ $(id -u) -eq 0 ]]; then
    echo "Fashion-MNIST missing; installing $PKG" >&2
    apt-get update
    apt-get install -y "$PKG"
    dir=$(package_dir)
    if has_files "$dir"; then
        echo "Fashion-MNIST: $dir"
        exit 0
    fi
    echo "installed $PKG but its IDX files are not in $dir" >&2
    exit 1
fi

echo "Fashion-MNIST is missing; install it with:" >&2
echo "sudo apt-get install $PKG"
exit 1
