#!/usr/bin/env python3
"""What cuDNN can do for each 3x3x3 convolution of a U-Net step, through PyTorch.

The device check prints cmseg's device time by convolution shape; this prints the
same shapes through PyTorch (cuDNN's graph API underneath), forward, data gradient
and filter gradient apart, for:
  - NCDHW and channels_last_3d tensors,
  - torch.backends.cudnn.benchmark off (heuristics, what `torch_reference.py bench`
    runs: PyTorch eager) and on (every engine timed, the best cuDNN offers),
so that a slow line of cmseg's table can be read against what the library offers.

  python3 scripts/torch_conv_bench.py --config brats3d-gpu [--reps 10]
"""
import argparse
import itertools
import json
import statistics
import sys

import torch

CONFIGS = {  # SPEC section 8: batch, input channels, size, depth, base channels
    "brats3d-gpu": (2, 4, 128, 4, 32),
    "brats3d-cpu": (1, 4, 64, 4, 16),
}


def conv_shapes(n, cin, size, depth, base):
    """(n, cin, cout, size) of every 3x3x3 convolution of the SPEC U-Net, in order."""
    shapes = []
    c_prev = cin
    for level in range(depth):
        c = base << level
        s = size >> level
        shapes += [(n, c_prev, c, s), (n, c, c, s)]
        c_prev = c
    for level in reversed(range(depth - 1)):
        c = base << level
        s = size >> level
        shapes += [(n, 2 * c, c, s), (n, c, c, s)]  # after the skip concat
    return shapes


def time_ms(fn, reps):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(shape, channels_last, benchmark, reps):
    n, cin, cout, s = shape
    torch.backends.cudnn.benchmark = benchmark
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    x = torch.randn(n, cin, s, s, s, device="cuda").contiguous(memory_format=fmt)
    w = (torch.randn(cout, cin, 3, 3, 3, device="cuda") * 0.05).contiguous(memory_format=fmt)
    dy = torch.randn(n, cout, s, s, s, device="cuda").contiguous(memory_format=fmt)
    args = ([1, 1, 1], [1, 1, 1], [1, 1, 1], False, [0, 0, 0], 1)

    def fwd():
        torch.nn.functional.conv3d(x, w, padding=1)

    def bwd(mask):
        return lambda: torch.ops.aten.convolution_backward(dy, x, w, None, *args, mask)

    return (time_ms(fwd, reps), time_ms(bwd([True, False, False]), reps), time_ms(bwd([False, True, False]), reps))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="brats3d-gpu", choices=sorted(CONFIGS))
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("torch_conv_bench: no GPU visible to torch")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default for convolutions
    shapes = conv_shapes(*CONFIGS[args.config])
    unique = list(dict.fromkeys(shapes))
    print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, {torch.cuda.get_device_name()}, "
          f"TF32, median of {args.reps}; ms per call (forward / data gradient / filter gradient)")
    print(f"{'shape':<22} {'calls':>5}  " + "  ".join(f"{m:>24}" for m in
          ("NCDHW heuristics", "NCDHW benchmark", "NDHWC heuristics", "NDHWC benchmark")))
    totals = {}
    for shape in unique:
        calls = shapes.count(shape)
        cells = []
        for cl, bench in itertools.product((False, True), (False, True)):
            try:
                f, d, w = measure(shape, cl, bench, args.reps)
            except RuntimeError as err:  # out of memory or an engine failure: a result, not a crash
                cells.append(f"{'error':>24}")
                print(f"  {shape}: {type(err).__name__}: {str(err)[:200]}", file=sys.stderr)
                continue
            t = totals.setdefault((cl, bench), [0.0, 0.0, 0.0])
            t[0] += calls * f
            t[1] += calls * d
            t[2] += calls * w
            cells.append(f"{f:7.2f} / {d:6.2f} / {w:6.2f}")
        n, cin, cout, s = shape
        print(f"{f'{cin}->{cout} {s}^3 n={n}':<22} {calls:>5}  " + "  ".join(cells))
    print("sum over the step's calls (ms): " + "; ".join(
        f"{'NDHWC' if cl else 'NCDHW'} {'benchmark' if b else 'heuristics'}: forward {t[0]:.1f}, data {t[1]:.1f}, "
        f"filter {t[2]:.1f}, all {sum(t):.1f}" for (cl, b), t in totals.items()))
    print("TORCH_CONV_JSON " + json.dumps({f"{'ndhwc' if cl else 'ncdhw'}_{'benchmark' if b else 'heuristics'}": t
                                          for (cl, b), t in totals.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
