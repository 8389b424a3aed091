#!/usr/bin/env python3
"""Reference label fusion with SimpleITK, for checking cmseg's native fusion.

Each CASE_DIR holds a `case.txt` of key=value lines and the raters' label maps:

    method=multilabel        # or: staple
    shape=24,32,40           # C-order (numpy) shape of every map
    raters=r0.u8,r1.u8,r2.u8 # raw uint8 files (C-order) or .npy, relative to CASE_DIR
    foreground=1             # staple only (default 1)
    undecided=4              # multilabel only (default: ITK's, max label + 1)
    max_iterations=1000      # optional
    threshold=1e-5           # multilabel only (ITK's default)

and receives, next to it:

    oracle_labels.u8      consensus labels: multilabel = ITK's output; staple = W > 0.5
    oracle_posterior.f32  staple only: ITK's W
    oracle_params.txt     line 1: iterations (staple only; 0 for multilabel, which
                          SimpleITK does not report); line 2: staple: sensitivity of
                          every rater then specificity of every rater; multilabel:
                          every rater's CM A[i][j] = p(rater says i | true j), [R, L, L]
                          row-major (ITK's extra row for its "undecided" input label
                          is dropped)
    oracle_seconds.txt    wall time of the SimpleITK filter alone

Example:
    python3 scripts/fusion_oracle.py /tmp/case1 /tmp/case2
Run by native/tests/test_fusion.cpp (test simpleitk_agreement) and scripts/bench_fusion.py.
"""
import os
import sys
import time

import numpy as np
import SimpleITK as sitk


def read_case(case_dir):
    cfg = {}
    with open(os.path.join(case_dir, "case.txt")) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                key, value = line.split("=", 1)
                cfg[key.strip()] = value.strip()
    shape = tuple(int(x) for x in cfg["shape"].split(","))
    maps = []
    for name in cfg["raters"].split(","):
        path = os.path.join(case_dir, name)
        if path.endswith(".npy"):
            arr = np.load(path).astype(np.uint8)
        else:
            arr = np.fromfile(path, dtype=np.uint8)
        if arr.size != int(np.prod(shape)):
            sys.exit(f"{path}: {arr.size} voxels, expected {shape} = {int(np.prod(shape))}")
        maps.append(arr.reshape(shape))
    return cfg, shape, maps


def run_multilabel(cfg, images):
    f = sitk.MultiLabelSTAPLEImageFilter()
    if "undecided" in cfg:
        f.SetLabelForUndecidedPixels(int(cfg["undecided"]))
    if "max_iterations" in cfg:
        f.SetMaximumNumberOfIterations(int(cfg["max_iterations"]))
    if "threshold" in cfg:
        f.SetTerminationUpdateThreshold(float(cfg["threshold"]))
    t0 = time.perf_counter()
    out = f.Execute(images)
    seconds = time.perf_counter() - t0
    labels = sitk.GetArrayFromImage(out).astype(np.uint8)
    cms = []
    for r in range(len(images)):
        cm = np.array(f.GetConfusionMatrix(r))
        L = int(round((np.sqrt(1 + 4 * cm.size) - 1) / 2))  # ITK stores (L + 1) x L
        cms.append(cm.reshape(L + 1, L)[:L])
    params = [[0], np.concatenate([c.reshape(-1) for c in cms])]
    return labels, None, params, seconds


def run_staple(cfg, images):
    f = sitk.STAPLEImageFilter()
    f.SetForegroundValue(float(cfg.get("foreground", 1)))
    if "max_iterations" in cfg:
        f.SetMaximumIterations(int(cfg["max_iterations"]))
    t0 = time.perf_counter()
    out = f.Execute(images)
    seconds = time.perf_counter() - t0
    W = sitk.GetArrayFromImage(out).astype(np.float32)
    labels = (W > 0.5).astype(np.uint8)
    params = [[f.GetElapsedIterations()], list(f.GetSensitivity()) + list(f.GetSpecificity())]
    return labels, W, params, seconds


def main(argv):
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(__doc__)
        return 0 if len(argv) >= 2 else 2
    for case_dir in argv[1:]:
        cfg, shape, maps = read_case(case_dir)
        images = [sitk.GetImageFromArray(m) for m in maps]
        method = cfg.get("method", "multilabel")
        if method == "multilabel":
            labels, W, params, seconds = run_multilabel(cfg, images)
        elif method == "staple":
            labels, W, params, seconds = run_staple(cfg, images)
        else:
            sys.exit(f"{case_dir}: unknown method {method!r} (multilabel or staple)")
        labels.tofile(os.path.join(case_dir, "oracle_labels.u8"))
        if W is not None:
            W.tofile(os.path.join(case_dir, "oracle_posterior.f32"))
        with open(os.path.join(case_dir, "oracle_params.txt"), "w") as f:
            for line in params:
                f.write(" ".join(repr(float(x)) for x in line) + "\n")
        with open(os.path.join(case_dir, "oracle_seconds.txt"), "w") as f:
            f.write(f"{seconds}\n")
        print(f"{case_dir}: {method} {shape} x {len(maps)} raters, SimpleITK {seconds * 1e3:.1f} ms -> {case_dir}/oracle_*")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
