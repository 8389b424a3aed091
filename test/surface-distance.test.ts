// Surface distances and HD95 (src/eval/surface-distance.ts) by hand and against SciPy
// (binary_erosion with the 3D cross, distance_transform_edt with the voxel spacing,
// numpy's percentile, the larger of the two directed percentiles: MONAI's
// compute_hausdorff_distance(percentile=95); MedPy's hd95 pools both directions and differs,
// see test/metrics-edges.test.ts).
import t from 'tap';
import * as fs from 'fs';
import * as path from 'path';
import { hausdorff95, percentile, squaredDistanceTransform, surfaceOf, type Dims3 } from '../src/eval/surface-distance';
import { tempDir } from './helpers/files';
import { missingPythonModules, runPythonJson } from './helpers/python';

const at = (dims: Dims3, d: number, h: number, w: number) => (d * dims[1] + h) * dims[2] + w;

t.test('the distance transform of one voxel is the spaced Euclidean distance', async (t) => {
  const dims: Dims3 = [5, 6, 7];
  const spacing = [1.5, 0.5, 2] as const;
  const feature = new Uint8Array(5 * 6 * 7);
  feature[at(dims, 1, 4, 2)] = 1;
  const dt = squaredDistanceTransform(feature, dims, spacing);
  let worst = 0;
  for (let d = 0; d < 5; d++)
    for (let h = 0; h < 6; h++)
      for (let w = 0; w < 7; w++) {
        const want = ((d - 1) * 1.5) ** 2 + ((h - 4) * 0.5) ** 2 + ((w - 2) * 2) ** 2;
        worst = Math.max(worst, Math.abs(dt[at(dims, d, h, w)] - want));
      }
  t.ok(worst < 1e-9, `max error ${worst}`);
  t.ok(squaredDistanceTransform(new Uint8Array(210), dims).every((x) => x === Infinity), 'no feature: Infinity');
});

t.test('surfaces: a solid cube keeps its faces, the volume edge counts as outside', async (t) => {
  const dims: Dims3 = [5, 5, 5];
  const cube = new Uint8Array(125);
  for (let d = 1; d < 4; d++) for (let h = 1; h < 4; h++) for (let w = 1; w < 4; w++) cube[at(dims, d, h, w)] = 1;
  const s = surfaceOf(cube, dims);
  t.equal(s.reduce((a, b) => a + b, 0), 26, '3^3 - 1 interior voxel');
  t.equal(s[at(dims, 2, 2, 2)], 0, 'the centre is inside');
  t.equal(surfaceOf(new Uint8Array(125).fill(1), dims).reduce((a, b) => a + b, 0), 125 - 27, 'a full volume: its outer shell');
});

t.test('HD95 by hand: single voxels, empty masks, percentiles', async (t) => {
  const dims: Dims3 = [6, 7, 8];
  const p = new Uint8Array(336);
  const y = new Uint8Array(336);
  p[at(dims, 1, 2, 3)] = 1;
  y[at(dims, 4, 2, 7)] = 1;
  t.ok(Math.abs(hausdorff95(p, y, dims, [2, 1, 0.5]) - Math.hypot(3 * 2, 0, 4 * 0.5)) < 1e-12, 'two voxels: their distance');
  t.equal(hausdorff95(p, p, dims), 0, 'identical masks');
  t.equal(hausdorff95(new Uint8Array(336), new Uint8Array(336), dims), 0, 'both empty: 0');
  t.ok(Number.isNaN(hausdorff95(p, new Uint8Array(336), dims)), 'one empty: NaN');
  t.equal(percentile(Float64Array.from([4, 1, 3, 2]), 50), 2.5);
  t.equal(percentile(Float64Array.from([0, 10]), 95), 9.5);
  t.throws(() => hausdorff95(p, y.subarray(1), dims), /336/);
  t.throws(() => hausdorff95(p, y, dims, [0, 1, 1]), /spacing 0, 1, 1 must be finite and > 0/);
});

t.test('HD95 against SciPy (MONAI-style HD95) on blobs with anisotropic voxels', { skip: missingPythonModules('numpy', 'scipy') }, async (t) => {
  const dims: Dims3 = [18, 22, 26];
  const V = dims[0] * dims[1] * dims[2];
  let s = 12345;
  const rand = () => (s = (s * 1664525 + 1013904223) >>> 0) / 4294967296;
  const blob = (cd: number, ch: number, cw: number, r: number, noise: number) => {
    const m = new Uint8Array(V);
    for (let d = 0; d < dims[0]; d++)
      for (let h = 0; h < dims[1]; h++)
        for (let w = 0; w < dims[2]; w++)
          m[at(dims, d, h, w)] = Math.hypot(d - cd, (h - ch) * 0.8, w - cw) < r + noise * (rand() - 0.5) ? 1 : 0;
    return m;
  };
  const cases = [
    { p: blob(8, 10, 12, 5, 1.5), y: blob(9, 11, 13, 6, 1.5), spacing: [1.2, 0.8, 1] },
    { p: blob(5, 5, 5, 3, 0), y: blob(12, 15, 19, 4, 2), spacing: [1, 1, 1] }, // far apart
    { p: blob(9, 11, 13, 8, 3), y: blob(9, 11, 13, 8, 3), spacing: [2, 0.5, 0.7] }, // ragged, overlapping
    { p: blob(0, 0, 0, 6, 1), y: blob(17, 21, 25, 6, 1), spacing: [1, 1, 1] }, // at the volume's corners
  ] as const;
  const dir = tempDir(t);
  const file = path.join(dir, 'masks.json');
  fs.writeFileSync(file, JSON.stringify({ dims, cases: cases.map((c) => ({ p: Array.from(c.p), y: Array.from(c.y), spacing: c.spacing })) }));
  const want = runPythonJson<number[]>(
    `
import json, sys
import numpy as np
from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure
data = json.load(open(sys.argv[1]))
dims = data["dims"]
cross = generate_binary_structure(3, 1)
def sds(a, b, sp):
    ab = a ^ binary_erosion(a, structure=cross, iterations=1)
    bb = b ^ binary_erosion(b, structure=cross, iterations=1)
    return distance_transform_edt(~bb, sampling=sp)[ab]
out = []
for c in data["cases"]:
    p = np.array(c["p"], dtype=bool).reshape(dims)
    y = np.array(c["y"], dtype=bool).reshape(dims)
    out.append(float(max(np.percentile(sds(p, y, c["spacing"]), 95), np.percentile(sds(y, p, c["spacing"]), 95))))
print(json.dumps(out))
`,
    [file],
  );
  cases.forEach((c, k) => {
    const got = hausdorff95(c.p, c.y, dims, c.spacing);
    t.ok(Math.abs(got - want[k]) < 1e-9 * Math.max(1, want[k]), `case ${k}: ${got} vs SciPy ${want[k]}`);
  });
});
