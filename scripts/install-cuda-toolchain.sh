#!/usr/bin/env bash
# Assemble a CUDA toolkit for building cmseg's CUDA backend from NVIDIA's Python
# wheels, without a system CUDA install (no root, no apt, no driver needed to build).
#
#   scripts/install-cuda-toolchain.sh [PREFIX] [--no-install]
#
# PREFIX (default: .cuda in the repository root) becomes a CUDA_HOME-style folder of
# symbolic links into the wheels:
#   PREFIX/bin/nvcc (and the tools nvcc calls), PREFIX/nvvm/, PREFIX/include/
#   (runtime, crt, cccl, cuBLAS, cuDNN headers), PREFIX/lib64/ (cudart, cublas,
#   cublasLt, cudnn, with the unversioned .so names the linker wants), PREFIX/lib -> lib64.
# The CUDA 13 wheels all unpack into site-packages/nvidia/cu13/ (cuDNN into
# site-packages/nvidia/cudnn/), which already has the toolkit's layout; the folder
# here only adds the names CMake and the linker look for.
#
# Missing wheels are pip-installed (PYTHON, default python3). nvcc, crt and nvvm are
# pinned to the installed runtime's version so headers and compiler agree.
# --no-install only links what is already installed (for machines with no registry).
# Safe to run again: links are replaced, nothing else is touched.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
prefix=""
install=1
for arg in "$@"; do
  case "$arg" in
    --no-install) install=0 ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "install-cuda-toolchain: unknown option $arg" >&2; exit 2 ;;
    *) prefix="$arg" ;;
  esac
done
prefix="${prefix:-$here/.cuda}"
PYTHON="${PYTHON:-python3}"

say() { echo "install-cuda-toolchain: $*"; }
die() { echo "install-cuda-toolchain: error: $*" >&2; exit 1; }

command -v "$PYTHON" >/dev/null || die "no $PYTHON on PATH (set PYTHON=...)"

# Version of an installed distribution, or nothing.
dist_version() {
  "$PYTHON" - "$1" <<'EOF' 2>/dev/null || true
import sys
from importlib import metadata
try:
    print(metadata.version(sys.argv[1]))
except metadata.PackageNotFoundError:
    pass
EOF
}

packages=(nvidia-cuda-runtime nvidia-cuda-nvcc nvidia-cuda-crt nvidia-nvvm nvidia-cuda-cccl nvidia-cudnn-cu13 nvidia-cublas)
if [ "$install" = 1 ]; then
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

read -r cu13 cudnn <<<"$("$PYTHON" - <<'EOF'
import os
try:
    import nvidia
    roots = list(nvidia.__path__)
except ImportError:
    roots = []
def find(sub, marker):
    for r in roots:
        d = os.path.join(r, sub)
        if os.path.exists(os.path.join(d, marker)):
            return d
    return "-"
print(find("cu13", "include/cuda_runtime.h"), find("cudnn", "include/cudnn.h"))
EOF
)"
[ "$cu13" != "-" ] || die "no CUDA 13 runtime wheel found (site-packages/nvidia/cu13); run without --no-install"
[ -x "$cu13/bin/nvcc" ] || die "no nvcc in $cu13/bin (pip install nvidia-cuda-nvcc)"
[ -d "$cu13/nvvm/bin" ] || die "no nvvm in $cu13 (pip install nvidia-nvvm)"
[ -f "$cu13/include/crt/host_config.h" ] || die "no crt headers in $cu13/include (pip install nvidia-cuda-crt)"
[ "$cudnn" != "-" ] || die "no cuDNN wheel with headers (site-packages/nvidia/cudnn/include/cudnn.h; pip install nvidia-cudnn-cu13)"

# ---- the CUDA_HOME-style folder ----------------------------------------------
mkdir -p "$prefix/bin" "$prefix/include" "$prefix/lib64"
# Links from an earlier run that point nowhere now (a wheel upgraded) are dropped.
find "$prefix/bin" "$prefix/include" "$prefix/lib64" -maxdepth 1 -type l ! -exec test -e {} \; -delete
link() { ln -sfn "$1" "$2"; }

for f in "$cu13"/bin/*; do link "$f" "$prefix/bin/$(basename "$f")"; done
link "$cu13/nvvm" "$prefix/nvvm"
# Headers: the toolkit's own (runtime, crt, cccl/, cuBLAS) and cuDNN's, side by side.
for f in "$cu13"/include/* "$cudnn"/include/*; do link "$f" "$prefix/include/$(basename "$f")"; done
# Libraries: every shared object and static archive, plus the unversioned names.
for f in "$cu13"/lib/*.so* "$cu13"/lib/*.a "$cudnn"/lib/*.so*; do
  [ -e "$f" ] || continue
  base="$(basename "$f")"
  link "$f" "$prefix/lib64/$base"
  case "$base" in
    *.so.*) link "$base" "$prefix/lib64/${base%%.so.*}.so" ;;
  esac
done
[ -d "$cu13/lib/stubs" ] && link "$cu13/lib/stubs" "$prefix/lib64/stubs"
link lib64 "$prefix/lib"
# Something FindCUDAToolkit can read the version from.
nvcc_version="$("$prefix/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')"
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
cat <<EOF

# Use this toolkit (paste into the shell, or prefix a cmake call):
export CUDA_HOME="$prefix"
export CUDAToolkit_ROOT="$prefix"
export CUDACXX="$prefix/bin/nvcc"
export CUDNN_ROOT="$prefix"
export PATH="$prefix/bin:\$PATH"
# then: cmake -S . -B build-cuda -DCMSEG_WITH_CUDA=ON -DCMAKE_CUDA_COMPILER=\$CUDACXX -DCUDNN_ROOT=\$CUDNN_ROOT
EOF
