#!/usr/bin/env python3
"""Multi-label STAPLE: cmseg (native/fusion) against SimpleITK on a BraTS-sized case.

Builds a synthetic 155 x 240 x 240 volume with 4 labels (nested ellipsoids like a
BraTS tumour: edema 1, enhancing rim 3, necrotic core 2) and 3 raters (one dilated,
one eroded, one with 5% random flips inside the tumour's box), then times

  * SimpleITK.MultiLabelSTAPLEImageFilter (in this process, all of ITK's threads), and
  * cmseg's multi_label_staple through the bench_fusion_main executable,

on the same input, and compares their consensus labels and confusion matrices.

Example:
    python3 scripts/bench_fusion.py --exe build-fusion/bench_fusion_main
    python3 scripts/bench_fusion.py --shape 64,96,96 --repeat 3
The raters and both results are written under --work (default: a temp folder).
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import SimpleITK as sitk


def ellipsoid(shape, centre, radii):
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    d = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii))
    return d < 1.0


def synthetic_case(shape, seed=0):
    rng = np.random.default_rng(seed)
    c = [n * f for n, f in zip(shape, (0.5, 0.45, 0.55))]
    big = [n * 0.18 for n in shape]

    def tumour(scale):
        t = np.zeros(shape, np.uint8)
        t[ellipsoid(shape, c, [r * scale for r in big])] = 1           # edema
        t[ellipsoid(shape, c, [r * scale * 0.6 for r in big])] = 3     # enhancing rim
        t[ellipsoid(shape, c, [r * scale * 0.35 for r in big])] = 2    # necrotic core
        return t

    truth = tumour(1.0)
    over, under = tumour(1.12), tumour(0.9)
    flips = truth.copy()
    box = tuple(slice(int(ci - 1.3 * r), int(ci + 1.3 * r)) for ci, r in zip(c, big))
    region = flips[box]
    mask = rng.random(region.shape) < 0.05
    region[mask] = (region[mask] + rng.integers(1, 4, mask.sum())) % 4
    return truth, [over, under, flips]


def simpleitk_staple(maps, undecided):
    images = [sitk.GetImageFromArray(m) for m in maps]
    f = sitk.MultiLabelSTAPLEImageFilter()
    f.SetLabelForUndecidedPixels(undecided)
    t0 = time.perf_counter()
    out = f.Execute(images)
    seconds = time.perf_counter() - t0
    L = len(np.unique(np.concatenate([np.unique(m) for m in maps])))
    cms = np.stack([np.array(f.GetConfusionMatrix(r)).reshape(L + 1, L)[:L] for r in range(len(maps))])
    return sitk.GetArrayFromImage(out), cms, seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="155,240,240", help="D,H,W (default BraTS: 155,240,240)")
    ap.add_argument("--exe", default=None, help="bench_fusion_main (default: build-fusion/ or build/ under the repo)")
    ap.add_argument("--repeat", type=int, default=5, help="cmseg runs (median reported)")
    ap.add_argument("--sitk-repeat", type=int, default=1, help="SimpleITK runs (median reported)")
    ap.add_argument("--work", default=None, help="folder for the raters and results")
    args = ap.parse_args()

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    exe = args.exe or next((p for p in (os.path.join(root, d, "bench_fusion_main") for d in ("build-fusion", "build"))
                            if os.path.exists(p)), None)
    if not exe or not os.path.exists(exe):
        sys.exit("bench_fusion_main not found: build it (see native/tests/bench_fusion_main.cpp) or pass --exe")
    shape = tuple(int(x) for x in args.shape.split(","))
    work = args.work or tempfile.mkdtemp(prefix="cmseg_bench_fusion_")
    os.makedirs(work, exist_ok=True)

    truth, maps = synthetic_case(shape)
    L, undecided = 4, 4  # ITK's default undecided label is max label + 1
    files = []
    for r, m in enumerate(maps):
        files.append(os.path.join(work, f"rater{r}.u8"))
        m.tofile(files[-1])

    sitk_times = []
    for _ in range(args.sitk_repeat):
        sitk_labels, sitk_cms, seconds = simpleitk_staple(maps, undecided)
        sitk_times.append(seconds)
    sitk_ms = 1e3 * float(np.median(sitk_times))

    labels_path, cm_path = os.path.join(work, "cmseg_labels.u8"), os.path.join(work, "cmseg_cm.txt")
    cmd = [exe, "--shape", ",".join(map(str, shape)), "--classes", str(L), "--repeat", str(args.repeat),
           "--undecided", str(undecided), "--out-labels", labels_path, "--out-cm", cm_path] + files
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{run.stdout}{run.stderr}")
    line = next(l for l in run.stdout.splitlines() if l.startswith("multi_label_staple"))
    cmseg_ms = float(line.split("median ")[1].split(" ms")[0])
    ours = np.fromfile(labels_path, np.uint8).reshape(shape)
    our_cms = np.loadtxt(cm_path).reshape(len(maps), L, L)

    V = int(np.prod(shape))
    same = float((ours == sitk_labels).mean())
    print(f"case: {shape} = {V} voxels, {len(maps)} raters, {L} labels  (raters and results in {work})")
    print(f"SimpleITK MultiLabelSTAPLE: {sitk_ms:9.1f} ms  (median of {args.sitk_repeat}, min {1e3 * min(sitk_times):.1f})")
    print(f"cmseg multi_label_staple:   {cmseg_ms:9.1f} ms  ({line.split(': ', 1)[1]})")
    print(f"speed-up: {sitk_ms / cmseg_ms:.1f}x")
    print(f"agreement: same label on {100 * same:.4f}% of voxels; max |CM difference| {np.abs(our_cms - sitk_cms).max():.2e}")
    print(f"accuracy vs the synthetic truth: cmseg {100 * (ours == truth).mean():.3f}%, "
          f"SimpleITK {100 * (sitk_labels == truth).mean():.3f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
