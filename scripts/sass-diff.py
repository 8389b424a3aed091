#!/usr/bin/env python3
"""Which kernels of a CUDA source compile to different machine code than at another commit.

  python3 scripts/sass-diff.py native/cuda/cm_loss.cu [BASE_REV] [--arch sm_90]

For changes made without a GPU: a refactor that leaves every existing kernel's SASS
identical cannot have changed what those kernels do or how fast they run, and a kernel
listed DIFF is one the next device run must check. Compiles the file as it is now and as
it was at BASE_REV (default HEAD; the other native/cuda files as they are now) with the
nvcc of .cuda/ (scripts/install-cuda-toolchain.sh), disassembles both with cuobjdump
(pip wheels nvidia-cuda-cuobjdump and -nvdisasm, fetched into .cuda-tools/ when not on PATH), and
compares each kernel's instructions with addresses and the file's anonymous-namespace
hash left out. Exit status 0 whatever it finds; 2 when it cannot compile or disassemble.
"""
import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cuobjdump():
    found = shutil.which("cuobjdump") or next(iter(glob.glob(os.path.join(ROOT, ".cuda-tools", "**", "bin", "cuobjdump"), recursive=True)), None)
    if found:
        return found
    dest = os.path.join(ROOT, ".cuda-tools")
    os.makedirs(dest, exist_ok=True)
    # cuobjdump 13.5 hands -sass to nvdisasm (NVDISASM_PATH, set below): both wheels.
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", dest, "nvidia-cuda-cuobjdump",
                    "nvidia-cuda-nvdisasm"], check=True)
    found = next(iter(glob.glob(os.path.join(dest, "**", "bin", "cuobjdump"), recursive=True)), None)
    if not found:
        sys.exit("sass-diff: nvidia-cuda-cuobjdump installed no cuobjdump")
    for tool in glob.glob(os.path.join(dest, "**", "bin", "*"), recursive=True):
        os.chmod(tool, 0o755)
    return found


def nvdisasm_env():
    """The environment for cuobjdump: NVDISASM_PATH at .cuda-tools' nvdisasm when it has one."""
    env = dict(os.environ)
    found = next(iter(glob.glob(os.path.join(ROOT, ".cuda-tools", "**", "bin", "nvdisasm"), recursive=True)), None)
    if found and "NVDISASM_PATH" not in env:
        env["NVDISASM_PATH"] = os.path.dirname(found)
        env["PATH"] = os.path.dirname(found) + os.pathsep + env.get("PATH", "")
    return env


def compile_sass(src, workdir, arch, tool):
    nvcc = os.path.join(ROOT, ".cuda", "bin", "nvcc")
    obj = os.path.join(workdir, os.path.basename(src) + ".o")
    cmd = [nvcc, "-I", os.path.join(ROOT, "native", "include"), "-I", os.path.join(ROOT, "native", "cuda"),
           "-isystem=" + os.path.join(ROOT, ".cuda", "include"), "-O3", "-std=c++17", "--expt-relaxed-constexpr",
           f"--generate-code=arch=compute_{arch[3:]},code={arch}", "-x", "cu", "-c", src, "-o", obj]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        print(r.stderr, file=sys.stderr)
        sys.exit(2)
    r = subprocess.run([tool, "-sass", obj], capture_output=True, text=True, env=nvdisasm_env())
    if r.returncode:
        print(r.stderr, file=sys.stderr)
        sys.exit(2)
    return r.stdout


def kernels(sass):
    out, name = {}, None
    for line in sass.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            # the anonymous namespace's mangled name: its length, a hash, the file's name
            name = re.sub(r"\d+_GLOBAL__N__[0-9a-f]{8}_\d+_.*?_cu_[0-9a-f]{8}", "ANON", m.group(1))
            out[name] = []
            continue
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
        if name and m:
            out[name].append(re.sub(r"0x[0-9a-f]+", "HEX", m.group(1)))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("source")
    ap.add_argument("base", nargs="?", default="HEAD")
    ap.add_argument("--arch", default="sm_90")
    a = ap.parse_args()
    rel = os.path.relpath(os.path.abspath(a.source), ROOT)
    old = subprocess.run(["git", "-C", ROOT, "show", f"{a.base}:{rel}"], capture_output=True, text=True)
    if old.returncode:
        sys.exit(f"sass-diff: {rel} is not in {a.base}")
    tool = cuobjdump()
    with tempfile.TemporaryDirectory() as tmp:
        # The old file beside the current headers, under its own name (same include paths).
        old_src = os.path.join(ROOT, "native", "cuda", f".sass-diff-{os.getpid()}-{os.path.basename(rel)}")
        try:
            with open(old_src, "w") as f:
                f.write(old.stdout)
            before = kernels(compile_sass(old_src, tmp, a.arch, tool))
        finally:
            os.unlink(old_src)
        after = kernels(compile_sass(os.path.join(ROOT, rel), tmp, a.arch, tool))
    same = 0
    for k in sorted(set(before) | set(after)):
        if k not in after:
            print(f"gone  {k}")
        elif k not in before:
            print(f"new   {k} ({len(after[k])} instructions)")
        elif before[k] != after[k]:
            print(f"DIFF  {k} ({len(before[k])} -> {len(after[k])} instructions)")
        else:
            same += 1
    print(f"{same} kernel(s) of {rel} compile to the same {a.arch} instructions as at {a.base}")


if __name__ == "__main__":
    main()
