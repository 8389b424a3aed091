// Measures this machine's single-precision FMA throughput: every thread runs
// independent chains of vector fused multiply-adds (no memory traffic), so the
// result approximates the FP32 peak that benchmarks report fractions of.
#pragma once

namespace cmseg {

// Returns GFLOP/s over all threads of the pool (2 FLOPs per FMA lane).
double measure_peak_gflops(double seconds);

}  // namespace cmseg
