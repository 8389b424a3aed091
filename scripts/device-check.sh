#!/usr/bin/env bash
# The one prepared check for a GPU machine (issue 8). Run from the repository root:
#
#   OUT=/some/dir scripts/device-check.sh        # OUT defaults to ./device-out
#
# From a session with the `run` tool, after `bash scripts/prepare-device-carry.sh`
# (builds dist/, packs this machine's Node into .device/node.xz):
#   run  command: bash scripts/device-check.sh
#        carry:   [".device", "dist", "node_modules/node-addon-api", "node_modules/node-api-headers",
#                  "node_modules/commander", "node_modules/cli-progress"]
# Without those the Node stages (addon, smoke, bench_node) are skipped, the rest runs.
#
# Stages (each with its own time limit; a failure is recorded and the next stage runs):
#   env        nvidia-smi, driver, CPU count, python/torch, cmake, nvcc, node
#   toolchain  nvcc (CUDACXX, PATH, /usr/local/cuda, .cuda) and cuDNN (the
#              nvidia-cudnn-cu13 wheel torch uses, else a system install)
#   configure  cmake -DCMSEG_WITH_CUDA=ON into build-device/ for this GPU's architecture
#   build      the library, the CUDA kernels and every native test
#   test_cuda  ctest -R test_cuda -V: every CUDA kernel against the CPU reference with
#              its tolerance; the whole GPU Model (strict fp32) against the CPU Model
#              (losses, every gradient, 3 Adam steps, predict; 2D/3D, full/lowrank/
#              global, head blocks, plain CE, param sync); GB/s of the memory-bound
#              kernels, conv TFLOP/s and the brats3d-gpu whole-step time
#   bench_gpu  cmseg_bench_gpu brats3d-gpu: median train step (TF32), voxels/s,
#              GFLOP/s, peak pool memory, fused CM loss GB/s (JSON like the torch bench),
#              and the device time of each layer per step (CMSEG_GPU_PROFILE=1), each
#              conv3 direction and shape on the fastest of four paths (cuDNN's legacy
#              or graph API, channels-last copies or NCDHW; every path's time listed);
#              then the same step varied, to check the defaults: bench_gpu_wgrad_own
#              (conv3's filter gradients through our own TF32 kernel), bench_gpu_wgrad_auto
#              (own kernel or cuDNN, timed per shape), wgrad_run_depth (the own kernel
#              with runs of 8 and 32 planes along depth), bench_gpu_all_candidates (auto
#              with the fused heads, the concat in place and the prefetching CM loss),
#              instance_norm_grid (instance norm's passes at 8 and 16 blocks per SM),
#              cm_loss_staged (the CM loss kernel whose tiles of pixels are copied
#              into shared memory ahead of their math, 3 and 2 slots),
#              cm_loss_prefetch (the CM loss kernel that loads the next annotator's
#              channels during this one's math), bench_gpu_legacy
#              (legacy cuDNN on channels-last copies for all), bench_gpu_ncdhw (legacy
#              cuDNN on the NCDHW tensors), bench_gpu_heads_fused (the heads' weight
#              gradients in one pass), bench_gpu_concat_in_place (the up-convolutions
#              written into the concat buffers), bench_gpu_candidates (both),
#              bench_gpu_overlap (filter gradients on a
#              second stream), cm_loss_grid (the fused CM loss at 2-32 blocks per SM), cm_loss_pairs
#              (its thread-per-pixel-and-annotator kernel), bench_gpu_bf16 (bf16
#              convolutions), bench_gpu_upconv_cudnn / _cl (transposed convolutions
#              through cuDNN instead of GEMMs); each run
#              also times its steps back to back and reports the device's idle time
#              between steps and its time by convolution shape
#   winners    scripts/device-winners.py: each candidate above against the default run
#              on the layers it changes (device time per step; > 3% saved and its
#              test_cuda cases passed), written as CMSEG_*=value; then under all of them
#              together: test_cuda_winners (the whole-model parity cases, the CM loss
#              cases), bench_gpu_winners and bench_gpu_bf16_winners. So one run measures
#              the defaults the next commit sets, without a second device call.
#   smoke      (Node) scripts/device-smoke.mjs: the addon's `device: 'cuda'` model
#              against its CPU model through the public API (gradients, 3 steps,
#              predict, parameter sync), 2D/3D, every CM mode, plain CE
#   smoke_winners  the same under the winners (when test_cuda_winners passed)
#   bench_node (Node) `cmseg bench --config brats3d-gpu` as users run it: cmseg TF32 and
#              torch eager TF32, cmseg bf16 and torch bf16 autocast, one table; under
#              the winners when smoke_winners passed (node.txt says which)
#   node_variants (Node) scripts/device-variants.mjs: the same training loop under each
#              conv3 option (default, legacy path, second stream, bf16)
#   cli_gpu    (Node) the BraTS CLI flow on the GPU: phantom, prepare, train
#              --preset brats3d-gpu (4 steps, validation), predict to NIfTI
#   bench_torch, bench_torch_bf16  torch_reference.py bench --config brats3d-gpu
#              --device cuda (torch defaults: TF32 convolutions), then --amp bf16
#              (skipped when bench_node ran: it has both)
#   torch_parity  the PyTorch reference on CUDA (exact fp32) against itself on the CPU
#              in float64, on a small 3D case: the oracle cmseg's GPU path will face
#   ctest      the other native tests (CPU reference, model, fusion) on this machine
#   torch_conv scripts/torch_conv_bench.py: each convolution of the step through PyTorch,
#              NCDHW / channels_last_3d, cudnn.benchmark off / on (what cuDNN offers)
# Stages run in that order of importance: when time runs short the last are skipped;
# DEVICE_CHECK_SKIP="stage stage ..." skips the named ones.
# Everything goes under $OUT (at most 8 files): summary.txt (always written, also when
# a stage fails or times out), log.txt (every stage's output), build.txt, test_cuda.txt,
# bench_gpu.txt, node.txt, ctest.txt, torch.txt. Whole run: under 8 minutes (DEVICE_CHECK_BUDGET_S,
# default 450).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT="$PWD"
OUT="${OUT:-$ROOT/device-out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
BUILD="$ROOT/build-device"
START=$(date +%s)
BUDGET=${DEVICE_CHECK_BUDGET_S:-450}
DEADLINE=$((START + BUDGET))
JOBS=$(nproc 2>/dev/null || echo 8)
LOG="$OUT/log.txt"
: >"$LOG"
STAGES=()  # "name|status|seconds"
export PYTHONUNBUFFERED=1

note() { echo "[device-check +$(($(date +%s) - START))s] $*" | tee -a "$LOG"; }

# stage NAME LIMIT_S FILE COMMAND: runs COMMAND under bash with a time limit (cut to
# what is left of the budget), appending its output to FILE (and log.txt).
stage() {
  local name="$1" limit="$2" file="$3" cmd="$4"
  if [[ " ${DEVICE_CHECK_SKIP:-} " == *" $name "* ]]; then
    STAGES+=("$name|skipped (DEVICE_CHECK_SKIP)|0")
    note "stage $name skipped: named in DEVICE_CHECK_SKIP"
    return 1
  fi
  local left=$((DEADLINE - $(date +%s) - 15))
  if [ "$left" -lt 10 ]; then
    STAGES+=("$name|skipped (out of time)|0")
    note "stage $name skipped: out of time"
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  note "stage $name (limit ${limit}s)"
  local t0=$(date +%s)
  local rc
  # Each stage's output starts with a marker (scripts/device-winners.py finds its runs by it).
  [ "$file" != "$LOG" ] && echo "=== stage $name" >>"$file"
  if [ "$file" = "$LOG" ]; then
    timeout --kill-after=5 "$limit" bash -c "$cmd" >>"$LOG" 2>&1
    rc=$?
  else
    timeout --kill-after=5 "$limit" bash -c "$cmd" 2>&1 | tee -a "$file" >>"$LOG"
    rc=${PIPESTATUS[0]}
  fi
  local dt=$(($(date +%s) - t0))
  local status=ok
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status="TIMEOUT after ${limit}s"; elif [ "$rc" != 0 ]; then status="FAIL (exit $rc)"; fi
  STAGES+=("$name|$status|$dt")
  [ "$file" != "$LOG" ] && echo "=== end of stage $name: $status" >>"$file"
  note "stage $name: $status in ${dt}s"
  [ "$rc" = 0 ]
}

write_summary() {
  local s="$OUT/summary.txt"
  {
    echo "cmseg device check — $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(($(date +%s) - START)) s in all"
    echo "GPU:       ${GPU_LINE:-unknown}"
    echo "nvcc:      ${NVCC:-none} ${NVCC_VERSION:-}"
    echo "cuDNN:     ${CUDNN_ROOT:-not found} ${CUDNN_VERSION:-}"
    echo "torch:     ${TORCH_LINE:-unknown}"
    echo
    echo "stage              status                         seconds"
    for row in "${STAGES[@]}"; do
      IFS='|' read -r n st sec <<<"$row"
      printf '%-18s %-30s %7s\n' "$n" "$st" "$sec"
    done
    echo
    if [ -s "$OUT/build.txt" ]; then
      echo "== configure"
      grep -E "cmseg(:| backends)" "$OUT/build.txt" | sed 's/^/  /'
      grep -E "error|Error" "$OUT/build.txt" | head -20 | sed 's/^/  /'
    fi
    if [ -s "$OUT/test_cuda.txt" ]; then
      echo "== test_cuda (CUDA kernels vs CPU reference; timings)"
      grep -E "SKIP|^([0-9]+: )?skip |device [0-9]|rel L2|identical|DIFFERENT|bf16 values|fell back|ran through it|in use [0-9]|cm_loss .* loss|GB/s|TFLOP/s|pool:|worst max-abs|predict max-abs|whole step|^[0-9]+: (ok|FAIL)|# [0-9]+ passed|FAIL|failed|exception" \
        "$OUT/test_cuda.txt" | sed -E 's/^[0-9]+: //; s/^/  /' | head -160
    fi
    if [ -s "$OUT/node.txt" ]; then
      echo "== Node: the addon's GPU model vs its CPU model (smoke), and cmseg bench brats3d-gpu"
      grep -E "^(ok  |FAIL)|^backend:|^\| |^[A-Z].*cores|Error|^trained |^cli_gpu|cmseg: error|windows in|under the winners|^bench_node under" "$OUT/node.txt" | sed 's/^/  /' | head -100
    fi
    if [ -s "$OUT/ctest.txt" ]; then
      echo "== ctest (other native tests)"
      grep -E "tests passed|tests failed|Failed|\*\*\*|Timeout" "$OUT/ctest.txt" | sed 's/^/  /'
    fi
    if grep -q "^variant " "$OUT/node.txt" 2>/dev/null; then
      echo "== the training loop through Node (dist/bench/worker.js) under each conv3 option"
      grep -h "^variant " "$OUT/node.txt" | sed 's/^/  /'
    fi
    # Issue 8's targets, read off this run's own numbers (users' bench through Node, and the
    # first bench_gpu run's CM loss against the datasheet bandwidth).
    python3 - "$OUT/node.txt" "$OUT/bench_gpu.txt" <<'TARGETS' 2>/dev/null
import json, re, sys
def lines(path):
    try:
        return open(path, encoding="utf-8", errors="replace").read().splitlines()
    except OSError:
        return []
out = []
bench = [json.loads(l[len("BENCH_JSON "):]) for l in lines(sys.argv[1]) if l.startswith("BENCH_JSON ")]
under = next((l for l in lines(sys.argv[1]) if l.startswith("bench_node under:")), "")
for r in (x for run in bench for x in run if x.get("config") == "brats3d-gpu"):
    def pair(ours, theirs, what, target):
        a, b = r.get(ours) or {}, r.get(theirs) or {}
        if a.get("ok") and b.get("ok"):
            ratio = b["stepMsMedian"] / a["stepMsMedian"]
            ma, mb = a.get("peakMemoryMB", 0), b.get("peakMemoryMB", 0)
            out.append(f"  {what}: PyTorch {b['stepMsMedian']:.1f} ms / cmseg {a['stepMsMedian']:.1f} ms = {ratio:.2f}x "
                       f"(target {target}x: {'MET' if ratio >= target else 'not met'}); peak memory cmseg {ma:.0f} "
                       f"vs PyTorch {mb:.0f} MiB ({'MET' if ma <= mb else 'not met'})")
    pair("cmseg", "torchEager", "TF32 step", 1.5)
    pair("cmsegBf16", "torchBf16", "bf16 step", 1.5)
stage, seen = "", set()
for l in lines(sys.argv[2]):
    st = re.match(r"^=== stage (\S+)$", l)
    if st:
        stage = st.group(1)
    m = re.match(r"^cm_loss bandwidth: ([0-9.]+) GB/s = ([0-9.]+)% of the datasheet's ([0-9.]+) GB/s, ([0-9.]+)% of a device copy's ([0-9.]+) GB/s", l)
    if m and stage in ("bench_gpu", "bench_gpu_winners") and stage not in seen:
        seen.add(stage)
        pct = float(m.group(2))
        what = "defaults" if stage == "bench_gpu" else "under the winners"
        out.append(f"  fused CM loss ({what}): {m.group(1)} GB/s = {pct:.0f}% of {m.group(3)} GB/s "
                   f"(target 70%: {'MET' if pct >= 70 else 'not met'}); {m.group(4)}% of a device copy")
if out:
    print("== issue 8 targets (this run)" + (f"; users' bench {under[len('bench_node '):]}" if under else ""))
    print("\n".join(out))
TARGETS
    if grep -q "^winners" "$OUT/bench_gpu.txt" 2>/dev/null; then
      echo "== candidates against the defaults, by the layers each changes (scripts/device-winners.py)"
      grep -E "^winners|under the winners" "$OUT/bench_gpu.txt" "$OUT/test_cuda.txt" | sed 's/^[^:]*txt://; s/^/  /'
      grep -E "^# [0-9]+ passed" "$OUT/test_cuda.txt" | tail -1 | sed 's/^/  test_cuda under the winners: /'
    fi
    if grep -q "device time by layer" "$OUT/bench_gpu.txt" 2>/dev/null; then
      echo "== cmseg GPU brats3d-gpu: device time by layer (CMSEG_GPU_PROFILE)"
      sed -n '/device time by layer/,/^  sum /p' "$OUT/bench_gpu.txt"
      echo "== bench_gpu runs: steps back to back (the period a training loop sees), device idle between them"
      grep -E "^  pipelined" "$OUT/bench_gpu.txt"
      echo "== the first bench_gpu run: device time by convolution shape"
      sed -n '/device time by convolution shape/,/end of shapes/p' "$OUT/bench_gpu.txt" | sed '/end of shapes/q'
      grep -hE "^cmseg: cm_loss (main|pairs|prefetch|staged) kernel" "$OUT/bench_gpu.txt" | sort -u
      grep -h "^cm_loss bandwidth:" "$OUT/bench_gpu.txt" | head -1 | sed 's/^/  first run: /'
      awk '/^cm_loss (grid|pairs kernel|prefetch kernel|staged kernel):/ { g = $0; w = 0; mf = ""; next }
           /^(wgrad run depth|instance norm grid):/ { g = $0; w = 1; next }
           g && w && /^cmseg GPU/ { match($0, /median [0-9.]+ ms\/step/); print "  " g " -> " substr($0, RSTART, RLENGTH); g = "" }
           g && !w && /cm_loss: main\+finish/ { mf = ", main kernel + finish " $3 " ms" }
           g && !w && /^cmseg GPU/ { match($0, /cm_loss [0-9.]+ ms, [0-9]+ GB\/s/); print "  " g " -> " substr($0, RSTART, RLENGTH) mf; g = "" }' \
        "$OUT/bench_gpu.txt"
    fi
    if grep -q "^cmseg: conv3 " "$OUT/bench_gpu.txt" 2>/dev/null; then
      echo "== conv3 path per direction and shape, timed (CMSEG_CONV_AUTOTUNE)"
      grep -h "^cmseg: conv3 " "$OUT/bench_gpu.txt" | sort -u | head -50 | cut -c1-400 | sed 's/^/  /'
    fi
    if grep -q "cmseg: cuDNN graph" "$OUT/bench_gpu.txt" "$OUT/test_cuda.txt" 2>/dev/null; then
      echo "== conv3 through cuDNN's graph API: the engine timed fastest per direction and shape"
      grep -h "cmseg: cuDNN graph" "$OUT/bench_gpu.txt" "$OUT/test_cuda.txt" | sed -E 's/^[0-9]+: //' | sort -u | head -60 | cut -c1-400 | sed 's/^/  /'
    fi
    if grep -q "^torch .*cuDNN" "$OUT/torch.txt" 2>/dev/null; then
      echo "== the same convolutions through PyTorch (torch_conv_bench.py)"
      sed -n '/^torch .*cuDNN/,/^sum over/p' "$OUT/torch.txt" | sed 's/^/  /'
    fi
    # Fallbacks only: the graph API's engine choices ("cmseg: cuDNN graph conv3 ...") are listed above.
    if grep -h "cmseg: cuDNN" "$OUT/bench_gpu.txt" "$OUT/test_cuda.txt" 2>/dev/null | grep -qv "cmseg: cuDNN graph conv3 "; then
      echo "== convolutions without a usable cuDNN algorithm or engine (fell back)"
      grep -h "cmseg: cuDNN" "$OUT/bench_gpu.txt" "$OUT/test_cuda.txt" | grep -v "cmseg: cuDNN graph conv3 " | sed -E 's/^[0-9]+: //' | sort -u | head -20 | cut -c1-600
    fi
    if [ -s "$OUT/torch.txt" ] || [ -s "$OUT/bench_gpu.txt" ]; then
      echo "== brats3d-gpu train step: cmseg GPU and the PyTorch reference (same machine), torch parity"
      python3 - "$OUT/bench_gpu.txt" "$OUT/torch.txt" <<'EOF' 2>/dev/null || grep -hE "^\{|parity" "$OUT/bench_gpu.txt" "$OUT/torch.txt" 2>/dev/null | sed 's/^/  /'
import json, os, sys
lines = []
for f in sys.argv[1:]:
    if os.path.exists(f):
        lines += open(f).read().splitlines()
for line in lines:
    line = line.strip()
    if line.startswith("parity"):
        print("  " + line)
        continue
    if not line.startswith("{"):
        continue
    try:
        r = json.loads(line)
    except ValueError:
        continue
    if "stepMsMedian" in r and r.get("bench") == "cmseg-gpu":
        mode = "bf16 convolutions" if r.get("bf16") else "TF32" if r.get("tf32") else "fp32"
        if r.get("bf16"):
            mode += ", cuDNN graph API on bf16 NDHWC copies"
        elif r.get("convAutotune"):
            mode += ", conv3 path timed per shape"
        elif "channelsLast" in r:
            mode += ", cuDNN " + ("graph API" if r.get("cudnnGraph") else "legacy API") + " on " + (
                "NDHWC copies" if r["channelsLast"] else "NCDHW tensors")
        if r.get("convOverlap"):
            mode += ", filter gradients on a second stream"
        if r.get("headsFused"):
            mode += ", heads' weight gradients fused"
        if r.get("concatInPlace"):
            mode += ", concat in place"
        if r.get("convWgrad", "cudnn") != "cudnn":
            mode += ", conv3 filter gradients " + r["convWgrad"]
        if r.get("cmLossKernel", "pixel") != "pixel":
            mode += ", CM loss kernel " + r["cmLossKernel"]
        if r.get("upconv"):
            mode += ", upconv2 " + r["upconv"]
        print(f"  cmseg GPU {r['config']} {mode}: median step {r['stepMsMedian']:.1f} ms, "
              f"{r['voxelsPerSecond'] / 1e6:.2f} Mvoxel/s, {r['gflopPerSecond']:.0f} GFLOP/s, "
              f"peak {r.get('peakGpuMB', 0):.0f} MiB, steps {r['stepMs']}; "
              f"fused CM loss {r['cmLossMs']:.3f} ms = {r['cmLossGBs']:.0f} GB/s"
              + (f" ({100 * r['cmLossGBs'] / r['peakMemoryGBs']:.0f}% of the datasheet's {r['peakMemoryGBs']:.0f}, "
                 f"{100 * r['cmLossGBs'] / r['deviceCopyGBs']:.0f}% of a copy's {r['deviceCopyGBs']:.0f})"
                 if r.get("peakMemoryGBs") and r.get("deviceCopyGBs") else "")
              + (f"; back to back {r['pipelinedMs']:.1f} ms/step" if "pipelinedMs" in r else ""))
    elif "stepMsMedian" in r:
        mode = "bf16 autocast" if r.get("amp") else "fp32 (torch default: TF32 convs)"
        print(f"  torch {r['config']} {mode}: median step {r['stepMsMedian']:.1f} ms, "
              f"{r['voxelsPerSecond'] / 1e6:.2f} Mvoxel/s, {r['gflopPerSecond']:.0f} GFLOP/s, "
              f"peak {r.get('peakGpuMB', 0):.0f} MiB, steps {r['stepMs']}")
    elif not r.get("ok", True):
        print(f"  {r.get('bench', 'torch')} bench error: " + str(r.get("error", r))[:300])
EOF
      [ -s "$OUT/torch.txt" ] && grep -E "^[A-Za-z.]*(Error|Exception)\b" "$OUT/torch.txt" | sort | uniq -c | head -5 | sed 's/^/  /'
    fi
  } >"$s"
  cat "$s"
}
trap write_summary EXIT

# ---- env ----------------------------------------------------------------------------
if ! command -v node >/dev/null 2>&1 && [ -f .device/node.xz ]; then
  # xz may be missing there; Python's lzma is not.
  { xz -dc .device/node.xz >.device/node 2>/dev/null ||
    python3 -c 'import lzma, shutil; shutil.copyfileobj(lzma.open(".device/node.xz"), open(".device/node", "wb"))'; } &&
    chmod +x .device/node && export PATH="$ROOT/.device:$PATH"
fi
GPU_LINE="$(nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader 2>/dev/null | head -1)"
TORCH_LINE="$(timeout 60 python3 -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), "gpu", torch.cuda.is_available())' 2>/dev/null)"
stage env 60 "$LOG" '
  nvidia-smi || echo "nvidia-smi failed"
  echo "cpus: $(nproc)"; uname -a
  python3 --version; cmake --version | head -1; (ninja --version 2>/dev/null | sed "s/^/ninja /") || true
  command -v nvcc && nvcc --version | tail -2 || echo "nvcc not on PATH"
  command -v node && node --version || echo "node: not available (only needed once the addon runs on the GPU)"
'

# ---- toolchain ----------------------------------------------------------------------
find_nvcc() {
  for c in "${CUDACXX:-}" "$(command -v nvcc 2>/dev/null)" "${CUDA_HOME:-/nonexistent}/bin/nvcc" /usr/local/cuda/bin/nvcc \
           "$ROOT/.cuda/bin/nvcc"; do
    [ -n "$c" ] && [ -x "$c" ] && "$c" --version >/dev/null 2>&1 && { echo "$c"; return 0; }
  done
  return 1
}
NVCC="$(find_nvcc)"
if [ -z "$NVCC" ]; then
  # No toolkit: assemble one from NVIDIA's wheels, if they are installed here (no registry on this machine).
  stage toolchain_wheels 60 "$LOG" "scripts/install-cuda-toolchain.sh '$ROOT/.cuda-device' --no-install" &&
    NVCC="$ROOT/.cuda-device/bin/nvcc"
fi
NVCC_VERSION="$( [ -n "$NVCC" ] && "$NVCC" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')"
CUDNN_ROOT="${CUDNN_ROOT:-$(python3 -c 'import nvidia.cudnn as m; print(list(m.__path__)[0])' 2>/dev/null)}"
if [ -z "$CUDNN_ROOT" ] || [ ! -f "$CUDNN_ROOT/include/cudnn.h" ]; then
  for d in "${CUDA_HOME:-/nonexistent}" /usr/local/cuda /usr; do
    [ -f "$d/include/cudnn.h" ] && { CUDNN_ROOT="$d"; break; }
  done
fi
CUDNN_VERSION="$( [ -f "$CUDNN_ROOT/include/cudnn_version.h" ] && awk '/define CUDNN_(MAJOR|MINOR|PATCHLEVEL) /{v=v (v?".":"") $3} END{print v}' "$CUDNN_ROOT/include/cudnn_version.h")"
ARCH="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')"
ARCH="${ARCH:-90}"
note "nvcc: ${NVCC:-none} ($NVCC_VERSION); cuDNN: ${CUDNN_ROOT:-none} ($CUDNN_VERSION); architecture sm_$ARCH"
STAGES+=("toolchain|$([ -n "$NVCC" ] && [ -n "$CUDNN_ROOT" ] && echo ok || echo 'FAIL (no nvcc or cuDNN)')|0")

# ---- configure + build ----------------------------------------------------------------
GEN=""
command -v ninja >/dev/null 2>&1 && GEN="-G Ninja"
[ -f "$BUILD/CMakeCache.txt" ] && ! grep -q "CMAKE_CUDA_COMPILER:.*=$NVCC\$" "$BUILD/CMakeCache.txt" && rm -rf "$BUILD"
# The Node addon too, when a Node binary and the two header packages came along
# (cmake-js itself is not needed: it would only pass these two variables).
ADDON_FLAGS=""
if command -v node >/dev/null 2>&1 && [ -f node_modules/node-api-headers/include/node_api.h ] &&
   [ -f node_modules/node-addon-api/napi.h ]; then
  ADDON_FLAGS="-DCMAKE_JS_VERSION=8.0.0 -DCMAKE_JS_INC='$ROOT/node_modules/node-api-headers/include'"
fi
if stage configure 120 "$OUT/build.txt" "cmake -S . -B '$BUILD' $GEN -DCMAKE_BUILD_TYPE=Release -DCMSEG_WITH_CUDA=ON \
      -DCMAKE_CUDA_COMPILER='$NVCC' -DCUDNN_ROOT='$CUDNN_ROOT' -DCMSEG_CUDA_ARCHITECTURES=$ARCH $ADDON_FLAGS"; then
  stage build 240 "$OUT/build.txt" "cmake --build '$BUILD' -j $JOBS"
fi

# ---- tests, then cmseg's own GPU benchmark -----------------------------------------------
if [ -x "$BUILD/test_cuda" ]; then
  stage test_cuda 240 "$OUT/test_cuda.txt" "ctest --test-dir '$BUILD' -R '^test_cuda\$' -V --timeout 230"
fi
WINNERS=""    # NAME=VALUE ... of the candidates that beat the defaults (stage winners)
WINNERS_OK=0  # 1 once the whole-model parity cases passed under them
if [ -x "$BUILD/cmseg_bench_gpu" ]; then
  stage bench_gpu 90 "$OUT/bench_gpu.txt" "CMSEG_GPU_PROFILE=1 '$BUILD/cmseg_bench_gpu' brats3d-gpu 5 tf32"
  # The default times each conv3 direction and shape on its four fp32 paths (cuDNN's
  # legacy or graph API, on channels-last copies or the NCDHW tensors) in the first
  # step and keeps the fastest (its stderr lists every path's time). The same step
  # with one path for all: the legacy API on channels-last copies (the default until
  # the seventh session), then on the NCDHW tensors (no copies).
  # conv3's filter gradients through our own TF32 kernel (CMSEG_CONV_WGRAD=own; cuDNN's
  # took 33 of the step's 78 ms on an H200), then per shape the faster of it and cuDNN
  # (auto: both times on stderr), then auto with the other candidates below.
  stage bench_gpu_wgrad_own 60 "$OUT/bench_gpu.txt" "CMSEG_CONV_WGRAD=own CMSEG_GPU_PROFILE=1 '$BUILD/cmseg_bench_gpu' brats3d-gpu 5 tf32"
  stage bench_gpu_wgrad_auto 60 "$OUT/bench_gpu.txt" "CMSEG_CONV_WGRAD=auto CMSEG_GPU_PROFILE=1 '$BUILD/cmseg_bench_gpu' brats3d-gpu 5 tf32"
  # The own kernel's runs along depth (16 planes by default): 8 and 32, the step and its
  # filter-gradient lines per shape.
  stage wgrad_run_depth 90 "$OUT/bench_gpu.txt" "set -o pipefail; rc=0; for r in 8 32; do echo wgrad run depth: \$r planes; CMSEG_CONV_WGRAD=own CMSEG_WGRAD_RUN_D=\$r CMSEG_GPU_PROFILE=1 '$BUILD/cmseg_bench_gpu' brats3d-gpu 3 tf32 2>&1 | grep -E '^cmseg GPU|conv3_backward_filter' || rc=1; done; exit \$rc"
  stage bench_gpu_all_candidates 60 "$OUT/bench_gpu.txt" "CMSEG_CONV_WGRAD=auto CMSEG_CONCAT_IN_PLACE=1 CMSEG_HEADS_WGRAD=fused CMSEG_CM_LOSS_KERNEL=prefetch CMSEG_GPU_PROFILE=1 '$BUILD/cmseg_bench_gpu' brats3d-gpu 5 tf32"
  # The fused CM loss with the next annotator's loads in flight during this one's math
  # (CMSEG_CM_LOSS_KERNEL=prefetch; the pixel kernel moved 2.4 of the H200's 4.8 TB/s)
  # at its default grid (8 blocks per SM asked, 4 resident) and at 4 and 16.
  stage cm_loss_prefetch 60 "$OUT/bench_gpu.txt" "set -o pipefail; rc=0; for b in 0 4 16; do echo cm_loss prefetch kernel: \$b blocks per SM; CMSEG_CM_LOSS_KERNEL=prefetch CMSEG_CM_LOSS_BLOCKS_PER_SM=\$b CMSEG_GPU_PROFILE=1 '$BUILD/cmseg_bench_gpu' brats3d-gpu 2 tf32 2>&1 | grep -E '^cmseg GPU|cm_loss (main|prefetch) kernel|cm_loss: main|^  cm_loss +[0-9]|^cm_loss bandwidth' || rc=1; done; exit \$rc"
  # The staged kernel (CMSEG_CM_LOSS_KERNEL=staged: tiles of pixels copied into shared
  # memory by cp.async ahead of their math) with 3 and 2 slots, one wave of blocks.
  stage cm_loss_staged 60 "$OUT/bench_gpu.txt" "set -o pipefail; rc=0; for st in 3 2; do echo cm_loss staged kernel: \$st slots; CMSEG_CM_LOSS_KERNEL=staged CMSEG_CM_LOSS_STAGES=\$st CMSEG_GPU_PROFILE=1 '$BUILD/cmseg_bench_gpu' brats3d-gpu 2 tf32 2>&1 | grep -E '^cmseg GPU|cm_loss (main|staged) kernel|cm_loss: main|^  cm_loss +[0-9]|^cm_loss bandwidth' || rc=1; done; exit \$rc"
  # Instance norm's passes at 8 and 16 blocks per SM (4 by default; they moved 58-72% of
  # the H200's bandwidth): the step and the instance-norm lines.
  stage instance_norm_grid 60 "$OUT/bench_gpu.txt" "set -o pipefail; rc=0; for b in 8 16; do echo instance norm grid: \$b blocks per SM; CMSEG_IN_BLOCKS_PER_SM=\$b CMSEG_GPU_PROFILE=1 '$BUILD/cmseg_bench_gpu' brats3d-gpu 3 tf32 2>&1 | grep -E '^cmseg GPU|^  instance_norm' || rc=1; done; exit \$rc"
  # The heads' weight and bias gradients in one fused pass (CMSEG_HEADS_WGRAD=fused; the
  # heads' backward took 4.3 ms of the step with cuBLAS per head on an H200).
  stage bench_gpu_heads_fused 60 "$OUT/bench_gpu.txt" "CMSEG_HEADS_WGRAD=fused CMSEG_GPU_PROFILE=1 '$BUILD/cmseg_bench_gpu' brats3d-gpu 5 tf32"
  # The up-convolutions written straight into the concat buffers (CMSEG_CONCAT_IN_PLACE=1;
  # concat forward + backward took 1.9 ms of the step), then both candidates together.
  stage bench_gpu_concat_in_place 60 "$OUT/bench_gpu.txt" "CMSEG_CONCAT_IN_PLACE=1 CMSEG_GPU_PROFILE=1 '$BUILD/cmseg_bench_gpu' brats3d-gpu 5 tf32"
  stage bench_gpu_candidates 60 "$OUT/bench_gpu.txt" "CMSEG_CONCAT_IN_PLACE=1 CMSEG_HEADS_WGRAD=fused CMSEG_GPU_PROFILE=1 '$BUILD/cmseg_bench_gpu' brats3d-gpu 5 tf32"
  # Which candidates won, on the layers each changes (scripts/device-winners.py; they
  # need their test_cuda cases passed), then the whole-model parity cases and the step
  # under all winners together; the Node benchmark below runs under them too.
  # (build-device/ outlives a call: an earlier call's winners must not stand in for this one's.)
  rm -f "$BUILD/winners.env"
  stage winners 20 "$OUT/bench_gpu.txt" "python3 scripts/device-winners.py '$OUT/bench_gpu.txt' '$OUT/test_cuda.txt' '$BUILD/winners.env'" &&
    WINNERS="$(grep -E '^CMSEG_[A-Z0-9_]+=[A-Za-z0-9-]+$' "$BUILD/winners.env" 2>/dev/null | tr '\n' ' ')"
  if [ -n "$WINNERS" ]; then
    stage test_cuda_winners 120 "$OUT/test_cuda.txt" "echo 'test_cuda under the winners: $WINNERS'; env $WINNERS '$BUILD/test_cuda' model_step_gpu heads_concat_ce_predict cm_loss_full cm_loss_lowrank cm_loss_global" &&
      WINNERS_OK=1
    stage bench_gpu_winners 60 "$OUT/bench_gpu.txt" "echo 'bench under the winners: $WINNERS'; env $WINNERS CMSEG_GPU_PROFILE=1 '$BUILD/cmseg_bench_gpu' brats3d-gpu 5 tf32"
    stage bench_gpu_bf16_winners 60 "$OUT/bench_gpu.txt" "echo 'bench under the winners: $WINNERS'; env $WINNERS CMSEG_GPU_PROFILE=1 '$BUILD/cmseg_bench_gpu' brats3d-gpu 5 bf16"
  fi
  stage bench_gpu_legacy 60 "$OUT/bench_gpu.txt" "CMSEG_CONV_AUTOTUNE=0 CMSEG_GPU_PROFILE=1 '$BUILD/cmseg_bench_gpu' brats3d-gpu 5 tf32"
  stage bench_gpu_ncdhw 60 "$OUT/bench_gpu.txt" "CMSEG_CONV_AUTOTUNE=0 CMSEG_CONV_CHANNELS_LAST=0 CMSEG_GPU_PROFILE=1 '$BUILD/cmseg_bench_gpu' brats3d-gpu 5 tf32"
  # conv3's filter gradient on a second stream beside its data gradient (CMSEG_CONV_OVERLAP;
  # each slowed the other on an H200).
  stage bench_gpu_overlap 120 "$OUT/bench_gpu.txt" "CMSEG_CONV_OVERLAP=1 CMSEG_GPU_PROFILE=1 '$BUILD/cmseg_bench_gpu' brats3d-gpu 5 tf32"
  # The fused CM loss against its grid size (it reached ~15% of the bandwidth with 8
  # blocks per SM): the same bench with 2, 4, 16 and 32.
  stage cm_loss_grid 90 "$OUT/bench_gpu.txt" "set -o pipefail; rc=0; for b in 2 4 16 32; do echo cm_loss grid: \$b blocks per SM; CMSEG_CM_LOSS_BLOCKS_PER_SM=\$b CMSEG_GPU_PROFILE=1 '$BUILD/cmseg_bench_gpu' brats3d-gpu 2 tf32 2>&1 | grep -E '^cmseg GPU|cm_loss main kernel' || rc=1; done; exit \$rc"
  # The pairs kernel (a thread per pixel and annotator; off by default until measured)
  # at its default grid (one wave of resident blocks) and at 2 and 16 blocks per SM.
  stage cm_loss_pairs 60 "$OUT/bench_gpu.txt" "set -o pipefail; rc=0; for b in 0 2 16; do echo cm_loss pairs kernel: \$b blocks per SM; CMSEG_CM_LOSS_KERNEL=pairs CMSEG_CM_LOSS_BLOCKS_PER_SM=\$b CMSEG_GPU_PROFILE=1 '$BUILD/cmseg_bench_gpu' brats3d-gpu 2 tf32 2>&1 | grep -E '^cmseg GPU|cm_loss (main|pairs) kernel' || rc=1; done; exit \$rc"
  # bf16 convolutions (config.bf16): compare with torch's bf16 autocast row.
  stage bench_gpu_bf16 60 "$OUT/bench_gpu.txt" "CMSEG_GPU_PROFILE=1 '$BUILD/cmseg_bench_gpu' brats3d-gpu 5 bf16"
  # The transposed convolutions through cuDNN (the default runs them as cuBLAS GEMMs
  # with our scatter/gather; cuDNN's NCDHW backward took 8.9 ms/step on an H200):
  # on the NCDHW tensors, then on channels-last copies.
  stage bench_gpu_upconv_cudnn 60 "$OUT/bench_gpu.txt" "CMSEG_UPCONV=cudnn CMSEG_GPU_PROFILE=1 '$BUILD/cmseg_bench_gpu' brats3d-gpu 5 tf32"
  stage bench_gpu_upconv_cl 60 "$OUT/bench_gpu.txt" "CMSEG_UPCONV=cudnn-cl CMSEG_GPU_PROFILE=1 '$BUILD/cmseg_bench_gpu' brats3d-gpu 5 tf32"
  # A convolution that fell back for want of workspace: the same bench with 8 GiB allowed.
  if grep -q "^cmseg: cuDNN offered no usable" "$OUT/bench_gpu.txt"; then
    stage bench_gpu_ws8g 90 "$OUT/bench_gpu.txt" "CMSEG_CUDNN_WORKSPACE_MB=8192 CMSEG_GPU_PROFILE=1 '$BUILD/cmseg_bench_gpu' brats3d-gpu 5 tf32"
  fi
fi

# ---- the addon through Node: parity via the public API, then the users' benchmark -----------
NODE_BENCH=0
if [ -f "$BUILD/cmseg.node" ] && [ -f dist/model/model.js ] && command -v node >/dev/null 2>&1; then
  export CMSEG_ADDON="$BUILD/cmseg.node"
  stage smoke 120 "$OUT/node.txt" "node scripts/device-smoke.mjs"
  # The users' benchmark runs under the winners once they passed the same checks.
  BENCH_ENV=""
  if [ "$WINNERS_OK" = 1 ]; then
    stage smoke_winners 120 "$OUT/node.txt" "echo 'smoke under the winners: $WINNERS'; env $WINNERS node scripts/device-smoke.mjs" &&
      BENCH_ENV="env $WINNERS"
  fi
  echo "bench_node under: ${BENCH_ENV:-the defaults}" >>"$OUT/node.txt"
  stage bench_node 200 "$OUT/node.txt" "$BENCH_ENV node -e '
    const b = require(\"./dist/bench/run.js\");
    const r = b.runBench({ configs: [\"brats3d-gpu\"], steps: 5, warmup: 1, log: (l) => console.error(l) });
    console.log(b.formatMachine(r)); console.log(b.formatBenchTable(r)); console.log(\"BENCH_JSON \" + JSON.stringify(r));
    process.exit(r.every((x) => x.cmseg && x.cmseg.ok) ? 0 : 1);'" && NODE_BENCH=1
  # The same loop under each conv3 option that may become the default (second stream
  # for filter gradients, path timed per shape, both; bf16 through the graph API).
  stage node_variants 150 "$OUT/node.txt" "node scripts/device-variants.mjs brats3d-gpu 5 1"
  # The users' BraTS flow on the GPU through the CLI: phantom cases in the BraTS layout,
  # prepare, train --preset brats3d-gpu (short; validation by sliding windows on the
  # GPU, checkpoints), predict to NIfTI. Needs commander and cli-progress carried.
  if [ -d node_modules/commander ] && [ -d node_modules/cli-progress ]; then
    stage cli_gpu 180 "$OUT/node.txt" "set -e; W=\$(mktemp -d); C='node $ROOT/dist/cli/main.js'; cd \$W
      \$C phantom brats --cases 3 --out phantom -q
      \$C prepare --data phantom --out cache -q
      \$C train --preset brats3d-gpu --data cache --steps 4 --steps-per-epoch 2 --val-cases 1 --patch 64 --out run --no-test -q
      tail -n 2 run/train-log.jsonl
      \$C predict --checkpoint run/best.safetensors --out pred
      ls pred | head -20; echo cli_gpu: ok"
  fi
else
  note "Node stages skipped: need node (or .device/node.xz), dist/ and node_modules/node-{addon-api,api-headers} carried"
  STAGES+=("node stages|skipped (no node/dist/headers)|0")
fi

# ---- PyTorch reference: the peer numbers (unless bench_node had them), then its own parity ---
if [ "$NODE_BENCH" = 0 ]; then
  stage bench_torch 120 "$OUT/torch.txt" \
    "python3 scripts/torch_reference.py bench --config brats3d-gpu --device cuda --steps 5 --warmup 1"
  stage bench_torch_bf16 90 "$OUT/torch.txt" \
    "python3 scripts/torch_reference.py bench --config brats3d-gpu --device cuda --steps 5 --warmup 1 --amp bf16"
fi

stage torch_parity 60 "$OUT/torch.txt" 'python3 - <<"EOF"
import os, sys, torch
sys.path.insert(0, "scripts")
import torch_reference as ref
import test_torch_reference as t
if not torch.cuda.is_available():
    print("parity: skipped, torch sees no GPU"); sys.exit(1)
cfg = t.tiny_config(3, "full", depth=3, L=4, R=3)
model, images, labels, present = t.random_problem(cfg, n=2, size=16, seed=3)
loss_cfg = {"lambda": 0.01, "lambdaWarmup": 0.01, "warmupSteps": 0}
optim_cfg = {"kind": "adam", "lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weightDecay": 0.0}
case = t.case_from_model(model, images, labels, present, loss_cfg, optim_cfg, 2)
ref.exact_float32_on_cuda()
gpu = ref.run_case(case, dtype=torch.float32, device="cuda")
cpu = ref.run_case(case, dtype=torch.float64, device="cpu")
worst = 0.0
for k, v in cpu.items():
    g = gpu[k].detach().double().cpu(); c = v.detach().double().cpu()
    e = float((g - c).norm() / c.norm().clamp_min(1e-12))
    worst = max(worst, e)
    if e > 1e-3: print(f"parity: {k} rel L2 {e:.2e} > 1e-3")
print(f"parity: torch_reference cuda fp32 vs cpu fp64, {len(cpu)} outputs (probs, CMs, losses, grads, 2 Adam steps): worst rel L2 {worst:.2e}")
sys.exit(0 if worst <= 1e-3 else 1)
EOF'

# ---- the other native tests (CPU), then what cuDNN offers each convolution through torch ----
if [ -x "$BUILD/test_cuda" ]; then
  stage ctest 60 "$OUT/ctest.txt" "ctest --test-dir '$BUILD' -E '^test_cuda\$' --output-on-failure --timeout 55"
fi
stage torch_conv 120 "$OUT/torch.txt" "python3 scripts/torch_conv_bench.py --config brats3d-gpu --reps 10"

FAILED=0
for row in "${STAGES[@]}"; do case "$row" in *"|ok|"*) ;; *) FAILED=1 ;; esac; done
exit $FAILED
