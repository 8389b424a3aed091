// BraTS label numbering per release: 2018-2021 files (ID_seg) use 1, 2, 4; 2023 files
// (ID-seg) use 1, 2, 3. A label of the other release in a file is an error naming the
// file, never silently merged into enhancing tumour (BraTS 2024 post-treatment's 4 is a
// resection cavity).

import t from 'tap';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { BratsError, discoverBratsCases, loadBratsCase, mapBratsLabels } from '../src/data/brats';
import { writeBratsPhantoms } from '../src/data/brats-phantom';
import { readNifti, writeNifti } from '../src/data/nifti';

const FILE_2021 = '/data/X/X_seg.nii.gz';
const FILE_2023 = '/data/X/X-seg.nii.gz';

t.test('2018-2021 names: 4 is enhancing tumour (read as 3), a 3 is an error', async (t) => {
  t.same([...mapBratsLabels([0, 1, 2, 4, 4], 'X', FILE_2021, '2021')], [0, 1, 2, 3, 3]);
  const err = t.throws(() => mapBratsLabels([0, 4, 3, 3, 1], 'X', FILE_2021, '2021')) as BratsError;
  t.equal(err.kind, 'bad-label');
  t.equal(err.path, FILE_2021);
  t.equal(err.value, 3);
  t.match(err.message, /^case X: label 3 at voxel 2 of \/data\/X\/X_seg\.nii\.gz \(2 voxels\) is not a BraTS 2018-2021 label/);
  t.match(err.message, /4 enhancing tumour \(ET\) and no 3/);
  t.match(err.message, /2023 names/, 'says what to do when the file already numbers ET 3');
  t.throws(() => mapBratsLabels([0, 3], 'X', FILE_2021, '2021'), { kind: 'bad-label' }, 'a 3 without any 4 too');
});

t.test('2023 names: 3 is enhancing tumour, a 4 is an error saying the 2023 convention', async (t) => {
  t.same([...mapBratsLabels([0, 1, 2, 3], 'X', FILE_2023, '2023')], [0, 1, 2, 3]);
  const err = t.throws(() => mapBratsLabels([0, 3, 4, 4, 4], 'X', FILE_2023, '2023')) as BratsError;
  t.equal(err.kind, 'bad-label');
  t.equal(err.path, FILE_2023);
  t.match(err.message, /^case X: label 4 at voxel 2 of \/data\/X\/X-seg\.nii\.gz \(3 voxels\) is not a BraTS 2023 label/);
  t.match(err.message, /1 necrotic core \(NCR\), 2 edema \(ED\), 3 enhancing tumour \(ET\)/);
  t.match(err.message, /resection cavity/);
});

t.test("other values name the release's labels; without a naming 3 and 4 may not meet", async (t) => {
  t.throws(() => mapBratsLabels([0, 7], 'X', FILE_2023, '2023'), { message: /label 7 at voxel 1 of .* is not a BraTS label \(0, 1, 2, 3 in BraTS 2023 files\)/ });
  t.throws(() => mapBratsLabels([0.5], 'X', FILE_2021, '2021'), { message: /label 0\.5 .*\(0, 1, 2, 4 in BraTS 2018-2021 files\)/ });
  t.same([...mapBratsLabels([3, 0], 'X', FILE_2023)], [3, 0]);
  t.same([...mapBratsLabels([4, 0], 'X', FILE_2021)], [3, 0]);
  t.throws(() => mapBratsLabels([3, 4], 'X', FILE_2021), { kind: 'bad-label', message: /holds both 3 and 4/ });
});

t.test('loading a case checks its segmentation against its own release', async (t) => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'cmseg-brats-labels-'));
  t.teardown(() => fs.rmSync(root, { recursive: true, force: true }));
  await writeBratsPhantoms(path.join(root, 'a'), { cases: 1, size: [24, 24, 16], seed: 3, naming: '2023' });
  await writeBratsPhantoms(path.join(root, 'b'), { cases: 1, size: [24, 24, 16], seed: 3, naming: '2021' });
  const [recent] = discoverBratsCases(path.join(root, 'a'));
  const [old] = discoverBratsCases(path.join(root, 'b'));
  // A block of 8 voxels of the other release's ET label (in a 2023 file: BraTS 2024's resection cavity).
  const addBlock = async (file: string, label: number) => {
    const seg = await readNifti(file);
    const labels = Float32Array.from(seg.data);
    for (let z = 2; z < 4; z++) for (let y = 2; y < 4; y++) for (let x = 2; x < 4; x++) labels[x + 24 * (y + 24 * z)] = label;
    await writeNifti(file, { dims: seg.dims, data: labels, affine: seg.affine }, { datatype: 'uint8' });
  };
  await addBlock(recent.seg!, 4);
  await t.rejects(loadBratsCase(recent), { kind: 'bad-label', path: recent.seg, message: /label 4 .*\(8 voxels\) is not a BraTS 2023 label/ });
  await addBlock(old.seg!, 3);
  await t.rejects(loadBratsCase(old), { kind: 'bad-label', path: old.seg, message: /label 3 .*\(8 voxels\) is not a BraTS 2018-2021 label/ });
});
