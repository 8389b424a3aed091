#!/usr/bin/env bash
# Assemble a CUDA toolkit for building cmseg's CUDA backend: for CUDA 13 from NVIDIA's
# Python wheels alone, without a system CUDA install (no root, no apt, no driver needed
# to build); for CUDA 12 from an installed CUDA 12 toolkit and the cuDNN wheel.
#
#   scripts/install-cuda-toolchain.sh [PREFIX] [--cuda 13|12] [--no-install]
#
# PREFIX (default: .cuda, or .cuda12 with --cuda 12, in the repository root) becomes a
# CUDA_HOME-style folder of symbolic links:
#   PREFIX/bin/nvcc (and the tools nvcc calls), PREFIX/nvvm/, PREFIX/include/
#   (runtime, crt, cccl, cuBLAS, cuDNN headers), PREFIX/lib64/ (cudart, cublas,
#   cublasLt, cudnn, with the unversioned .so names the linker wants), PREFIX/lib -> lib64.
#
# --cuda 13 (the default): everything from the CUDA 13 wheels, which all unpack into
# site-packages/nvidia/cu13/ (cuDNN into site-packages/nvidia/cudnn/) and already have
# the toolkit's layout; the folder here only adds the names CMake and the linker look
# for. Missing wheels are pip-installed (PYTHON, default python3); nvcc, crt and nvvm are
# pinned to the installed runtime's version so headers and compiler agree. A CUDA 13
# build needs a CUDA 13 driver (580 or newer).
#
# --cuda 12: for machines whose driver is CUDA 12 (525 or newer). NVIDIA's cu12 wheels
# have no compiler (nvidia-cuda-nvcc-cu12 holds only ptxas and libnvvm; no nvcc, cicc,
# cudafe++, fatbinary or nvlink), so nvcc, the runtime, cccl and cuBLAS come from an
# installed CUDA 12 toolkit: CUDA12_HOME, else CUDA_HOME, /usr/local/cuda,
# /usr/local/cuda-12.* (newest first), or the one holding the nvcc on PATH, the first
# that is a 12.x toolkit with NVIDIA's layout (bin/nvcc.profile, nvvm/bin/cicc).
# cuDNN, which no toolkit ships, comes from the nvidia-cudnn-cu12 wheel (PyTorch's
# CUDA 12 builds install it); cuBLAS too (nvidia-cublas-cu12 of the toolkit's minor
# version) if the toolkit has none. nvidia-cudnn-cu12 and -cu13 unpack into the same
# site-packages/nvidia/cudnn/, so keep them in separate environments (a venv, PYTHON=).
#
# --no-install only links what is already installed (for machines with no registry).
# Safe to run again: links are replaced, nothing else is touched.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
prefix=""
install=1
cuda=13
while [ "$#" -gt 0 ]; do
  case "$1" in
    --no-install) install=0 ;;
    --cuda) [ "$#" -ge 2 ] || { echo "install-cuda-toolchain: --cuda needs 12 or 13" >&2; exit 2; }
            cuda="$2"; shift ;;
    --cuda=*) cuda="${1#--cuda=}" ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    -*) echo "install-cuda-toolchain: unknown option $1" >&2; exit 2 ;;
    *) prefix="$1" ;;
  esac
  shift
done
case "$cuda" in
  12) prefix="${prefix:-$here/.cuda12}" ;;
  13) prefix="${prefix:-$here/.cuda}" ;;
  *) echo "install-cuda-toolchain: --cuda takes 12 or 13, not '$cuda'" >&2; exit 2 ;;
esac
PYTHON="${PYTHON:-python3}"

say() { echo "install-cuda-toolchain: $*"; }
die() { echo "install-cuda-toolchain: error: $*" >&2; exit 1; }

command -v "$PYTHON" >/dev/null || die "no $PYTHON on PATH (set PYTHON=...)"

# Version of an installed distribution, or nothing.
dist_version() {
  "$PYTHON" - "$1" <<'PYEOF' 2>/dev/null || true
import sys
from importlib import metadata
try:
    print(metadata.version(sys.argv[1]))
except metadata.PackageNotFoundError:
    pass
PYEOF
}

# The folder site-packages/nvidia/SUB that holds MARKER, or "-".
wheel_dir() {
  "$PYTHON" - "$1" "$2" <<'PYEOF'
import os, sys
try:
    import nvidia
    roots = list(nvidia.__path__)
except ImportError:
    roots = []
for r in roots:
    d = os.path.join(r, sys.argv[1])
    if os.path.exists(os.path.join(d, sys.argv[2])):
        print(d)
        break
else:
    print("-")
PYEOF
}

# The release (12.4, 13.0, ...) an nvcc reports, or nothing.
nvcc_release() { { "$1" --version 2>/dev/null || true; } | sed -n 's/.*release \([0-9.]*\),.*/\1/p'; }

if [ "$cuda" = 13 ]; then
  # ---- CUDA 13: every piece from the wheels -------------------------------------
  packages=(nvidia-cuda-runtime nvidia-cuda-nvcc nvidia-cuda-crt nvidia-nvvm nvidia-cuda-cccl nvidia-cudnn-cu13 nvidia-cublas)
  if [ "$install" = 1 ]; then
    # nvidia-cudnn-cu13 would unpack over a PyTorch CUDA 12 environment's cuDNN (the
    # same folder): refused before anything is installed.
    cudnn12="$(dist_version nvidia-cudnn-cu12)"
    if [ -n "$cudnn12" ] && [ -z "$(dist_version nvidia-cudnn-cu13)" ]; then
      die "$PYTHON has nvidia-cudnn-cu12 $cudnn12 (PyTorch's CUDA 12 builds install it), which shares site-packages/nvidia/cudnn with nvidia-cudnn-cu13: use an environment without it (python3 -m venv DIR; PYTHON=DIR/bin/python), or --cuda 12 for a CUDA 12 driver"
    fi
    runtime_version="$(dist_version nvidia-cuda-runtime)"
    if [ -z "$runtime_version" ]; then
      say "installing nvidia-cuda-runtime (CUDA 13)"
      "$PYTHON" -m pip install -q "nvidia-cuda-runtime>=13,<14"
      runtime_version="$(dist_version nvidia-cuda-runtime)"
    fi
    [ -n "$runtime_version" ] || die "nvidia-cuda-runtime did not install"
    case "$runtime_version" in 13.*) ;; *) die "nvidia-cuda-runtime $runtime_version is not CUDA 13" ;; esac
    want=()
    for p in "${packages[@]}"; do
      have="$(dist_version "$p")"
      if [ -n "$have" ]; then
        say "have $p $have"
        continue
      fi
      case "$p" in
        # The compiler must match the runtime headers it compiles against.
        nvidia-cuda-nvcc|nvidia-cuda-crt|nvidia-nvvm) want+=("$p==$runtime_version") ;;
        nvidia-cudnn-cu13) want+=("$p>=9,<10") ;;
        *) want+=("$p>=13,<14") ;;
      esac
    done
    if [ "${#want[@]}" -gt 0 ]; then
      say "pip install ${want[*]}"
      "$PYTHON" -m pip install -q "${want[@]}"
    fi
  fi

  root="$(wheel_dir cu13 include/cuda_runtime.h)"
  cudnn="$(wheel_dir cudnn include/cudnn.h)"
  [ "$root" != "-" ] || die "no CUDA 13 runtime wheel found (site-packages/nvidia/cu13); run without --no-install"
  [ -x "$root/bin/nvcc" ] || die "no nvcc in $root/bin (pip install nvidia-cuda-nvcc)"
  [ -d "$root/nvvm/bin" ] || die "no nvvm in $root (pip install nvidia-nvvm)"
  [ -f "$root/include/crt/host_config.h" ] || die "no crt headers in $root/include (pip install nvidia-cuda-crt)"
  [ "$cudnn" != "-" ] || die "no cuDNN wheel with headers (site-packages/nvidia/cudnn/include/cudnn.h; pip install nvidia-cudnn-cu13)"
  root_lib="$root/lib"
  wheels=("$cudnn")
else
  # ---- CUDA 12: an installed toolkit, cuDNN from the cu12 wheel ------------------
  # Prints the release of a CUDA 12 toolkit with NVIDIA's layout at $1; fails otherwise.
  # (A distribution's nvidia-cuda-toolkit package spreads nvcc over /usr/bin and
  # /usr/lib/nvidia-cuda-toolkit and its headers over /usr/include: not linked here.)
  toolkit_release() {
    [ -x "$1/bin/nvcc" ] && [ -f "$1/bin/nvcc.profile" ] && [ -x "$1/nvvm/bin/cicc" ] &&
      [ -f "$1/include/cuda_runtime.h" ] && [ -d "$1/lib64" ] || return 1
    local v
    v="$(nvcc_release "$1/bin/nvcc")"
    case "$v" in 12.*) echo "$v" ;; *) return 1 ;; esac
  }
  candidates=()
  if [ -n "${CUDA12_HOME:-}" ]; then
    candidates=("$CUDA12_HOME")
  else
    [ -n "${CUDA_HOME:-}" ] && candidates+=("$CUDA_HOME")
    candidates+=(/usr/local/cuda)
    while IFS= read -r d; do candidates+=("$d"); done < <(ls -d /usr/local/cuda-12.* 2>/dev/null | sort -V -r)
    on_path="$(command -v nvcc 2>/dev/null || true)"
    [ -n "$on_path" ] && candidates+=("$(dirname "$(dirname "$(readlink -f "$on_path")")")")
  fi
  root=""
  for c in "${candidates[@]}"; do
    if release="$(toolkit_release "$c")"; then
      root="$c"
      break
    fi
  done
  if [ -z "$root" ]; then
    if [ -n "${CUDA12_HOME:-}" ]; then
      found="$(nvcc_release "$CUDA12_HOME/bin/nvcc")"
      die "CUDA12_HOME=$CUDA12_HOME is not a CUDA 12 toolkit (bin/nvcc of release 12.x${found:+, not $found}; bin/nvcc.profile, nvvm/bin/cicc, include/cuda_runtime.h, lib64/)"
    fi
    die "no CUDA 12 toolkit found (looked at: ${candidates[*]}). NVIDIA's cu12 wheels have no nvcc, so a CUDA 12 build needs an installed toolkit: NVIDIA's installer or its package repository (cuda-toolkit-12-x, into /usr/local/cuda-12.x); or set CUDA12_HOME to one"
  fi
  say "CUDA $release toolkit at $root"
  root_lib="$root/lib64"
  [ -n "$(ls "$root_lib"/libcudart.so* 2>/dev/null)" ] || die "no libcudart.so in $root_lib"

  cudnn13="$(dist_version nvidia-cudnn-cu13)"
  [ -z "$cudnn13" ] || die "$PYTHON has nvidia-cudnn-cu13 $cudnn13, which shares site-packages/nvidia/cudnn with nvidia-cudnn-cu12: use an environment without it (python3 -m venv DIR; PYTHON=DIR/bin/python)"
  # cuBLAS from the toolkit when it has one (it always does when installed whole), else
  # the wheel of the toolkit's minor version.
  cublas_wheel=0
  [ -f "$root/include/cublas_v2.h" ] && [ -n "$(ls "$root_lib"/libcublas.so* 2>/dev/null)" ] || cublas_wheel=1
  if [ "$install" = 1 ]; then
    want=()
    have="$(dist_version nvidia-cudnn-cu12)"
    if [ -n "$have" ]; then say "have nvidia-cudnn-cu12 $have"; else want+=("nvidia-cudnn-cu12>=9,<10"); fi
    if [ "$cublas_wheel" = 1 ]; then
      have="$(dist_version nvidia-cublas-cu12)"
      case "$have" in
        "$release".*) say "have nvidia-cublas-cu12 $have" ;;
        *) want+=("nvidia-cublas-cu12==$release.*") ;;
      esac
    fi
    if [ "${#want[@]}" -gt 0 ]; then
      say "pip install ${want[*]}"
      "$PYTHON" -m pip install -q "${want[@]}"
    fi
  fi
  [ -n "$(dist_version nvidia-cudnn-cu12)" ] || die "no nvidia-cudnn-cu12 in $PYTHON's environment; run without --no-install"
  cudnn="$(wheel_dir cudnn include/cudnn.h)"
  [ "$cudnn" != "-" ] || die "the nvidia-cudnn-cu12 wheel has no include/cudnn.h (site-packages/nvidia/cudnn)"
  wheels=("$cudnn")
  if [ "$cublas_wheel" = 1 ]; then
    cublas="$(wheel_dir cublas include/cublas_v2.h)"
    [ "$cublas" != "-" ] || die "no cuBLAS in $root, nor the nvidia-cublas-cu12 wheel; run without --no-install"
    wheels+=("$cublas")
  fi
fi

# ---- the CUDA_HOME-style folder ----------------------------------------------
mkdir -p "$prefix/bin" "$prefix/include" "$prefix/lib64"
# Links from an earlier run that point nowhere now (a wheel upgraded) are dropped.
find "$prefix/bin" "$prefix/include" "$prefix/lib64" -maxdepth 1 -type l ! -exec test -e {} \; -delete
link() { ln -sfn "$1" "$2"; }

for f in "$root"/bin/*; do link "$f" "$prefix/bin/$(basename "$f")"; done
link "$root/nvvm" "$prefix/nvvm"
# Headers: the toolkit's own (runtime, crt, cccl/, cuBLAS) and the wheels' (cuDNN, and
# cuBLAS where the toolkit has none), side by side; a wheel's header wins a shared name.
# Libraries: every shared object and static archive, plus the unversioned names.
headers=("$root"/include/*)
libs=("$root_lib"/*.so* "$root_lib"/*.a)
for w in "${wheels[@]}"; do
  headers+=("$w"/include/*)
  libs+=("$w"/lib/*.so*)
done
for f in "${headers[@]}"; do link "$f" "$prefix/include/$(basename "$f")"; done
for f in "${libs[@]}"; do
  [ -e "$f" ] || continue
  base="$(basename "$f")"
  link "$f" "$prefix/lib64/$base"
  case "$base" in
    *.so.*) link "$base" "$prefix/lib64/${base%%.so.*}.so" ;;
  esac
done
[ -d "$root_lib/stubs" ] && link "$root_lib/stubs" "$prefix/lib64/stubs"
link lib64 "$prefix/lib"
# Something FindCUDAToolkit can read the version from.
nvcc_version="$(nvcc_release "$prefix/bin/nvcc")"
[ -n "$nvcc_version" ] || die "$prefix/bin/nvcc --version failed"
printf 'CUDA Version %s\n' "$nvcc_version" >"$prefix/version.txt"

# ---- check: nvcc compiles and links a kernel here ------------------------------
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cat >"$tmp/probe.cu" <<'EOF'
#include <cstdio>
#include <cuda_runtime.h>
#include <cublas_v2.h>
#include <cudnn.h>
__global__ void axpy(int n, float a, const float* x, float* y) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] += a * x[i];
}
int main() {
  int devices = 0;
  cudaError_t e = cudaGetDeviceCount(&devices);
  std::printf("probe: cuDNN %zu (headers %d.%d.%d), devices %d (%s)\n", cudnnGetVersion(), CUDNN_MAJOR, CUDNN_MINOR,
              CUDNN_PATCHLEVEL, e == cudaSuccess ? devices : 0, cudaGetErrorString(e));
  if (e == cudaSuccess && devices > 0) {
    float* d = nullptr;
    cudaMalloc(&d, 64 * sizeof(float));
    axpy<<<1, 64>>>(64, 2.f, d, d);
    std::printf("probe: kernel %s\n", cudaGetErrorString(cudaDeviceSynchronize()));
    cudaFree(d);
  }
  return 0;
}
EOF
"$prefix/bin/nvcc" -std=c++17 -arch=sm_80 -o "$tmp/probe" "$tmp/probe.cu" \
  -L"$prefix/lib64" -lcudnn -lcublas -Xlinker -rpath -Xlinker "$prefix/lib64" \
  || die "nvcc could not build a probe kernel"
"$tmp/probe" || die "the probe program did not run"

say "nvcc $nvcc_version at $prefix/bin/nvcc; cuDNN from $cudnn"
build_dir=build-cuda
[ "$cuda" = 13 ] || build_dir=build-cuda$cuda
cat <<EOF

# Use this toolkit (paste into the shell, or prefix a cmake call):
export CUDA_HOME="$prefix"
export CUDAToolkit_ROOT="$prefix"
export CUDACXX="$prefix/bin/nvcc"
export CUDNN_ROOT="$prefix"
export PATH="$prefix/bin:\$PATH"
# then: cmake -S . -B $build_dir -DCMSEG_WITH_CUDA=ON -DCMAKE_CUDA_COMPILER=\$CUDACXX -DCUDNN_ROOT=\$CUDNN_ROOT
EOF
