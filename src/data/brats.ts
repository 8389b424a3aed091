// BraTS case folders: finding the cases, reading their four MR modalities and the tumour
// segmentation, and the preprocessing every case gets once before training (MONAI /
// nnU-Net style): brain mask, per-modality z-score over the brain, crop to the brain.
//
// Layouts read (one folder per case, folder name = case id, .nii.gz or .nii):
//   BraTS 2018-2021  ID/ID_t1.nii.gz  ID/ID_t1ce.nii.gz  ID/ID_t2.nii.gz  ID/ID_flair.nii.gz  ID/ID_seg.nii.gz
//   BraTS 2023       ID/ID-t1n.nii.gz ID/ID-t1c.nii.gz   ID/ID-t2w.nii.gz ID/ID-t2f.nii.gz    ID/ID-seg.nii.gz
// The channel order is always [t1, t1ce, t2, flair] (2023: t1n, t1c, t2w, t2f).
//
// Labels. BraTS 2018-2021 segmentations use 0 background, 1 necrotic / non-enhancing
// core (NCR), 2 peritumoural edema (ED), 4 enhancing tumour (ET); there is no 3. The 2023
// release renumbered ET to 3, so its files already hold 0..3. We map 2018-2021's 4 to 3,
// giving the classes 0..3 that SPEC section 7 uses. Each file must keep its release's
// numbering: a 3 in a 2018-2021 file or a 4 in a 2023 file (BraTS 2024 post-treatment's
// resection cavity) is an error, never merged into enhancing tumour.
//
// BraTS-PEDs 2024 (pediatric) files have 2023 names but their own numbering: 1 enhancing
// tumour (ET), 2 non-enhancing tumour (NET), 3 cystic component (CC), 4 peritumoural edema
// (ED); its regions are ET = {1}, TC = {1, 2, 3}, WT = {1, 2, 3, 4} (the challenge's own
// scoring, github.com/rachitsaluja/BraTS-2024-Metrics metrics_PED.py). Nothing in a file
// tells it from a 2023 file (BraTS-PEDs 2023 used the same ids with 2023 labels), so it is
// read only when asked for (label scheme 'peds2024', `cmseg prepare --label-scheme`): ET to
// our 3, NET and CC both to our 1 (the non-enhancing core), ED to our 2. Our regions WT, TC,
// ET are then exactly the challenge's; NET and CC are not told apart (BraTS-PEDs 2023 merged
// them the same way).
//
// Layout of the folder: one folder per case, or (BraTS 2018/2019) one more level of
// grouping folders, ROOT/HGG/ID/... and ROOT/LGG/ID/...
//
// Memory layout. A NIfTI volume stores x fastest: voxel (x, y, z) at x + nx*(y + ny*z).
// Our tensors are C-order [C, D, H, W] with D = z, H = y, W = x, so voxel (z, y, x) of
// channel c is at x + W*(y + H*(z + D*c)): the very same order, no transposition. Shapes
// in this module are therefore written [C, D, H, W] = [4, nz, ny, nx], and NIfTI dims
// [nx, ny, nz] = [W, H, D].

import * as fs from 'fs';
import * as path from 'path';
import { type Extent } from './morphology';
import { isNiftiName, type Matrix4, type NiftiHeader, type NiftiVolume, type Vec3, readNifti } from './nifti';

// ---------------------------------------------------------------------------
// Constants: one source of truth for the dataset layout

export const BRATS_MODALITIES = ['t1', 't1ce', 't2', 'flair'] as const;
export type BratsModality = (typeof BRATS_MODALITIES)[number];
export const BRATS_CHANNELS = BRATS_MODALITIES.length;

/** Classes after mapping label 4 to 3. */
export const BRATS_CLASSES = 4;
export const BRATS_CLASS_NAMES = ['background', 'necrotic core (NCR)', 'edema (ED)', 'enhancing tumour (ET)'] as const;

/** The label BraTS 2018-2021 files use for enhancing tumour, and ours for it. */
export const BRATS_ENHANCING_LABEL_2021 = 4;
export const BRATS_ENHANCING_LABEL = 3;

export type BratsNaming = '2021' | '2023';

/**
 * How a segmentation's numbers are read: 'brats' by the release its file names say (2018-2021:
 * ET = 4; 2023: ET = 3), 'peds2024' as BraTS-PEDs 2024 (1 ET, 2 NET, 3 CC, 4 ED; 2023 names).
 */
export type BratsLabelScheme = 'brats' | 'peds2024';
export const BRATS_LABEL_SCHEMES: readonly BratsLabelScheme[] = ['brats', 'peds2024'];

/**
 * Our classes' names as the segmentations read with `scheme` mean them: read as BraTS-PEDs
 * 2024, class 1 is the non-enhancing tumour and the cysts (there is no necrosis label).
 */
export function bratsClassNames(scheme: BratsLabelScheme = 'brats'): readonly string[] {
  return scheme === 'peds2024' ? ['background', 'non-enhancing core (NET + CC)', 'edema (ED)', 'enhancing tumour (ET)'] : BRATS_CLASS_NAMES;
}

/** BraTS-PEDs 2024 label -> our class: 1 ET -> 3, 2 NET -> 1, 3 CC -> 1, 4 ED -> 2. */
export const BRATS_PEDS_2024_CLASSES: readonly number[] = [0, 3, 1, 1, 2];
/** Our class -> the BraTS-PEDs 2024 label written for it (class 1 as NET: NET and CC are one class). */
export const BRATS_PEDS_2024_RELEASE: readonly number[] = [0, 2, 4, 1];

/** File-name pieces per release: ID + separator + suffix + .nii(.gz). */
export const BRATS_NAMING: Record<BratsNaming, { separator: string; modalities: Record<BratsModality, string>; seg: string }> = {
  '2021': { separator: '_', modalities: { t1: 't1', t1ce: 't1ce', t2: 't2', flair: 'flair' }, seg: 'seg' },
  '2023': { separator: '-', modalities: { t1: 't1n', t1ce: 't1c', t2: 't2w', flair: 't2f' }, seg: 'seg' },
};

const NIFTI_EXTENSIONS = ['.nii.gz', '.nii'] as const;

/**
 * A NIfTI name that may be a case's file. Hidden names are not: a release zipped on macOS
 * and unpacked elsewhere holds AppleDouble files (._ID_t1.nii.gz, resource forks, not
 * NIfTI) beside the files and in a __MACOSX/ copy of the folders, and copies from a Mac
 * onto FAT/exFAT disks leave them too; read as NIfTI names they made __MACOSX/ID a
 * misnamed case ("rename it ._ID") that stopped discovery.
 */
function isCaseFileName(name: string): boolean {
  return isNiftiName(name) && !name.startsWith('.');
}

// ---------------------------------------------------------------------------
// Errors

export type BratsErrorKind =
  | 'missing-folder'
  | 'no-cases'
  | 'missing-file'
  | 'not-a-case'
  | 'misnamed-case'
  | 'duplicate-case'
  | 'ambiguous-naming'
  | 'ambiguous-file'
  | 'bad-dims'
  | 'mismatched-dims'
  | 'mismatched-affine'
  | 'bad-intensity'
  | 'bad-label'
  | 'empty-brain'
  | 'bad-crop';

/** Something wrong with a BraTS case; `caseId` and `path` say which case and file. */
export class BratsError extends Error {
  constructor(
    readonly kind: BratsErrorKind,
    /** The case concerned ('' when the problem is the folder itself). */
    readonly caseId: string,
    /** The file or folder concerned. */
    readonly path: string,
    message: string,
    /** The offending value. */
    readonly value?: unknown,
    options?: { cause?: unknown },
  ) {
    super(caseId ? `case ${caseId}: ${message}` : message, options);
    this.name = 'BratsError';
  }
}

// ---------------------------------------------------------------------------
// Discovery

/** One case on disk: where its files are. */
export interface BratsCase {
  id: string;
  dir: string;
  naming: BratsNaming;
  /** Modality files in channel order [t1, t1ce, t2, flair]. */
  images: [string, string, string, string];
  /** The segmentation, when there is one (validation/test sets have none). */
  seg?: string;
}

export interface DiscoverOptions {
  /** Throw when a case has no segmentation (default true: training needs one). */
  requireSeg?: boolean;
  /**
   * Called once, with a one-line note, when entries that are not cases were skipped: NIfTI
   * files beside the case folders, folders of other NIfTI files (say a predictions folder).
   */
  onSkipped?: (note: string) => void;
}

/** What a search of a data folder found: the cases, and the entries skipped (shown as "name/" or "name.nii.gz"). */
interface Found {
  cases: BratsCase[];
  skipped: string[];
}

/**
 * Every case under `root` (one subfolder per case), sorted by id. BraTS 2018/2019 group
 * the cases one level deeper (root/HGG/ID/..., root/LGG/ID/...): a subfolder without
 * NIfTI files of its own is searched for case folders too, and so is a case folder that
 * holds only a folder of its own name (root/HGG/ID/ID/..., a zip extracted into it). Other
 * subfolders without any NIfTI file are ignored (those with case folders further down are
 * named to `onSkipped`). NIfTI files beside the case folders, and folders whose NIfTI
 * files are not a case's (predictions written into the data folder), are skipped and
 * reported to `onSkipped`. A folder that is a case but an incomplete one is an error
 * naming the case and the missing file, and so is a folder of no case at all.
 */
export function discoverBratsCases(root: string, options: DiscoverOptions = {}): BratsCase[] {
  const found: Found = { cases: [], skipped: [] };
  // Cases are collected without requiring a segmentation, which is checked below over all of
  // them: a folder in which no case has one is a validation or test release, said as such.
  const requireSeg = options.requireSeg ?? true;
  const collect: DiscoverOptions = { ...options, requireSeg: false };
  // Sorted, so that notes and errors list the same entries first on every file system.
  for (const entry of readFolder(root).sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0))) {
    const full = path.join(root, entry.name);
    if (isDirectory(full)) collectCases(full, entry.name, collect, found, 1);
    else if (isCaseFileName(entry.name)) found.skipped.push(entry.name);
  }
  if (found.cases.length === 0) {
    const hint = bratsLayoutHint(root);
    throw new BratsError(
      'no-cases',
      '',
      root,
      `no BraTS cases in ${root}: expected subfolders ID/ID_t1.nii.gz, ID_t1ce, ID_t2, ID_flair, ID_seg ` +
        `(BraTS 2018-2021) or ID/ID-t1n.nii.gz, ID-t1c, ID-t2w, ID-t2f, ID-seg (BraTS 2023)` +
        (found.skipped.length > 0 ? `; found only ${listSkipped(found.skipped)}` : '') +
        (hint ? `; ${hint}` : ''),
      root,
    );
  }
  if (found.skipped.length > 0) options.onSkipped?.(skippedNote(root, found.skipped));
  checkUniqueIds(found.cases);
  found.cases.sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
  if (requireSeg) checkSegmentations(root, found.cases);
  return found.cases;
}

/** Every case must have a segmentation: the first without one is a BratsError('missing-file'). */
function checkSegmentations(root: string, cases: readonly BratsCase[]): void {
  const lacking = cases.filter((c) => !c.seg);
  if (lacking.length === 0) return;
  if (lacking.length === cases.length && cases.length > 1) {
    const c = lacking[0];
    const { separator, seg } = BRATS_NAMING[c.naming];
    const expected = path.join(c.dir, `${c.id}${separator}${seg}.nii.gz`);
    throw new BratsError(
      'missing-file',
      '',
      expected,
      `missing segmentation in all ${cases.length} cases of ${root} (${expected} not found, nor .nii): ` +
        'a validation or test release has none; training and its cache need one per case (cmseg predict reads cases without)',
      expected,
    );
  }
  // The case's own error, with what its folder holds instead.
  bratsCaseInFolder(lacking[0].dir, { requireSeg: true });
}

function readFolder(root: string): fs.Dirent[] {
  try {
    return fs.readdirSync(root, { withFileTypes: true });
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ENOTDIR') {
      throw new BratsError('missing-folder', '', root, `BraTS data folder not found: ${root}`, root, { cause: err });
    }
    throw err;
  }
}

/**
 * Adds the case in `dir` (shown as `shown`) to `found`, or skips it when its NIfTI files are
 * not a case's; a folder without NIfTI files is searched `levels` levels deeper.
 */
function collectCases(dir: string, shown: string, options: DiscoverOptions, found: Found, levels: number): void {
  try {
    const c = bratsCaseInFolder(dir, options);
    if (c) found.cases.push(c);
    else if (levels > 0) {
      for (const entry of fs.readdirSync(dir)) {
        const sub = path.join(dir, entry);
        if (isDirectory(sub)) collectCases(sub, `${shown}/${entry}`, options, found, levels - 1);
      }
    } else {
      // The last level searched, and no NIfTI file here. A case zip extracted into a folder of
      // its own name (HGG/ID/ID/...) is read as ROOT/ID/ID is; other case folders further down
      // were silently left out of the data set: they are named in the note of skipped entries.
      const name = path.basename(dir);
      const twin = path.join(dir, name);
      const inTwin = isDirectory(twin) ? caseOrUndefined(twin, options) : undefined;
      if (inTwin) found.cases.push(inTwin);
      else {
        const deeper = caseFolderBelow(dir, options);
        if (deeper) found.skipped.push(`${shown}/ (case folders further down, such as ${shown}/${deeper}/, are not read)`);
      }
    }
  } catch (error) {
    if (!(error instanceof BratsError && error.kind === 'not-a-case')) throw error;
    found.skipped.push(`${shown}/`);
  }
}

/** The case in `dir`, or undefined when it is no case ('not-a-case' or no NIfTI files); other errors are thrown. */
function caseOrUndefined(dir: string, options: DiscoverOptions): BratsCase | undefined {
  try {
    return bratsCaseInFolder(dir, options);
  } catch (error) {
    if (error instanceof BratsError && error.kind === 'not-a-case') return undefined;
    throw error;
  }
}

/** The name of a subfolder of `dir` that is a case folder (the first 64 subfolders are looked at), if any. */
function caseFolderBelow(dir: string, options: DiscoverOptions): string | undefined {
  let entries: string[];
  try {
    entries = fs.readdirSync(dir).sort().slice(0, 64);
  } catch {
    return undefined;
  }
  for (const entry of entries) {
    const sub = path.join(dir, entry);
    if (!isDirectory(sub)) continue;
    try {
      if (bratsCaseInFolder(sub, { ...options, requireSeg: false })) return entry;
    } catch {
      // not a case (or a broken one): only the note is at stake here
    }
  }
  return undefined;
}

function skippedNote(root: string, skipped: readonly string[]): string {
  const one = skipped.length === 1;
  return `skipped ${skipped.length} ${one ? 'entry' : 'entries'} of ${root} that ${one ? 'is' : 'are'} not a BraTS case: ${listSkipped(skipped)}`;
}

/** "a/, b.nii.gz, c/ and 3 more": names enough to find them, on one line. */
function listSkipped(skipped: readonly string[], shown = 4): string {
  const more = skipped.length - shown;
  return skipped.slice(0, shown).join(', ') + (more > 0 ? ` and ${more} more` : '');
}

/**
 * One folder per case id. Ids equal but for upper and lower case are refused too: a cache
 * names each case's file by its id, and on a case-insensitive disk (macOS, Windows) the two
 * would share one file.
 */
function checkUniqueIds(cases: readonly BratsCase[]): void {
  const seen = new Map<string, BratsCase>();
  for (const c of cases) {
    const other = seen.get(c.id.toLowerCase());
    if (other?.id === c.id) {
      throw new BratsError('duplicate-case', c.id, c.dir, `${other.dir} and ${c.dir} are both case ${c.id}; keep one`, c.dir);
    }
    if (other) {
      throw new BratsError('duplicate-case', c.id, c.dir, `${other.dir} (case ${other.id}) and ${c.dir} (case ${c.id}) differ only in upper and lower case, and would share one cache file on a case-insensitive disk; rename one`, c.dir);
    }
    seen.set(c.id.toLowerCase(), c);
  }
}

function isDirectory(p: string): boolean {
  try {
    return fs.statSync(p).isDirectory();
  } catch {
    return false;
  }
}

// Every modality suffix of both namings (longest first, so that t1ce is not read as t1).
const MODALITY_SUFFIXES = [...new Set((Object.keys(BRATS_NAMING) as BratsNaming[]).flatMap((n) => Object.values(BRATS_NAMING[n].modalities)))].sort(
  (a, b) => b.length - a.length,
);
const MODALITY_FILE = new RegExp(`^(.+)[_-](${MODALITY_SUFFIXES.join('|')})\\.nii(\\.gz)?$`, 'i');

/** The case ids that the modality files among `names` belong to ("X_t1.nii.gz", "X-t2f.nii" -> X), in order. */
function caseIdsOfFiles(names: readonly string[]): string[] {
  const ids = names.map((name) => MODALITY_FILE.exec(name)?.[1]).filter((id): id is string => id !== undefined);
  return [...new Set(ids)];
}

/**
 * What to do about a folder that holds BraTS modality files itself rather than in case
 * folders: it is one case folder (pass its parent), a case folder named otherwise than its
 * files (rename it), or several cases' files side by side (one folder per case). Undefined
 * when its files look like none of these.
 */
export function bratsLayoutHint(dir: string): string | undefined {
  let names: string[];
  try {
    names = fs.readdirSync(dir).filter(isCaseFileName);
  } catch {
    return undefined;
  }
  const id = path.basename(dir);
  // No NIfTI file here at all: the cases may sit further down than the layouts read (a zip
  // extracted into a folder of its own name: ROOT/MICCAI_BraTS_2019_Data_Training/HGG/ID/...).
  if (names.length === 0) return deeperCasesHint(dir);
  const ids = caseIdsOfFiles(names);
  if (ids.length === 0) return undefined;
  if (ids.some((other) => other.toLowerCase() === id.toLowerCase())) {
    return `${dir} is the folder of the single case ${id}: pass the folder that holds the case folders (${path.dirname(dir)})`;
  }
  if (ids.length === 1) {
    return `${dir} holds the files of case ${ids[0]} (${ids[0]}_t1.nii.gz or ${ids[0]}-t1n.nii.gz ...): a case folder must be named by its case id, so rename it ${ids[0]}`;
  }
  return (
    `${dir} holds the files of ${ids.length} cases side by side (${ids.slice(0, 2).join(', ')}, ...): ` +
    `put each case's files in a folder named by its id (${ids[0]}/${ids[0]}_t1.nii.gz ...)`
  );
}

/**
 * "the case folders are further down: ..." when a folder below `dir` (breadth first, up to
 * four levels, a bounded number of folders) is a case folder: names the folder to pass, the
 * one holding the case folders (above an HGG/ or LGG/ grouping folder, read as 2018/2019's).
 */
function deeperCasesHint(dir: string): string | undefined {
  let level = [dir];
  let visited = 0;
  for (let depth = 1; depth <= 4 && level.length > 0; depth++) {
    const next: string[] = [];
    for (const parent of level) {
      let entries: string[];
      try {
        entries = fs.readdirSync(parent).sort();
      } catch {
        continue;
      }
      for (const entry of entries) {
        const sub = path.join(parent, entry);
        if (!isDirectory(sub)) continue;
        if (++visited > 2000) return undefined;
        let found: BratsCase | undefined;
        try {
          found = bratsCaseInFolder(sub, { requireSeg: false });
        } catch {
          found = undefined; // not a case (or a broken one): look further
        }
        if (found) {
          const holder = path.dirname(sub);
          const pass = /^(hgg|lgg)$/i.test(path.basename(holder)) ? path.dirname(holder) : holder;
          if (path.relative(dir, pass) === '') return undefined; // the layouts read would have found it
          return `the case folders are further down (${sub} is case ${found.id}): pass the folder that holds them (${pass})`;
        }
        next.push(sub);
      }
    }
    level = next;
  }
  return undefined;
}

/**
 * The case stored in one folder (named by its id), or undefined when the folder holds no
 * NIfTI files at all. Names are matched case-insensitively; two files for one modality
 * (ID_t1.nii.gz beside ID_t1.nii, or names differing in case) are a BratsError
 * ('ambiguous-file'): which one is meant cannot be told, and they may differ.
 * NIfTI files none of which is a modality named by the folder's id are a BratsError:
 * kind 'misnamed-case' when they are another case's modalities (the folder is a case under
 * the wrong name, or several cases' files), else 'not-a-case' (other files, say predictions).
 */
export function bratsCaseInFolder(dir: string, options: DiscoverOptions = {}): BratsCase | undefined {
  const requireSeg = options.requireSeg ?? true;
  const id = path.basename(dir);
  const files = fs.readdirSync(dir).filter(isCaseFileName);
  if (files.length === 0) return undefined;
  const lookup = (naming: BratsNaming, suffix: string): string | undefined => {
    const stem = `${id}${BRATS_NAMING[naming].separator}${suffix}`.toLowerCase();
    const found = files.filter((name) => NIFTI_EXTENSIONS.some((ext) => name.toLowerCase() === stem + ext));
    if (found.length > 1) {
      throw new BratsError('ambiguous-file', id, dir, `${dir} holds both ${found.join(' and ')}: keep one (which is meant cannot be told, and they may differ)`, found);
    }
    return found.length === 1 ? path.join(dir, found[0]) : undefined;
  };
  const matches = (naming: BratsNaming) => {
    const images = BRATS_MODALITIES.map((m) => lookup(naming, BRATS_NAMING[naming].modalities[m]));
    const seg = lookup(naming, BRATS_NAMING[naming].seg);
    return { images, seg, count: images.filter(Boolean).length };
  };
  const old = matches('2021');
  const recent = matches('2023');
  if (old.count === 0 && recent.count === 0) {
    const hint = bratsLayoutHint(dir);
    throw new BratsError(
      hint ? 'misnamed-case' : 'not-a-case',
      id,
      dir,
      hint ?? `no modality files named ${id}_t1.nii.gz (BraTS 2018-2021) or ${id}-t1n.nii.gz (BraTS 2023) in ${dir}; found ${listSkipped(files)}`,
      files,
    );
  }
  if (old.count > 0 && recent.count > 0) {
    throw new BratsError(
      'ambiguous-naming',
      id,
      dir,
      `${dir} mixes BraTS 2018-2021 names (${id}_t1...) and BraTS 2023 names (${id}-t1n...); keep one`,
      files,
    );
  }
  const naming: BratsNaming = old.count > 0 ? '2021' : '2023';
  const chosen = naming === '2021' ? old : recent;
  const { separator, modalities, seg } = BRATS_NAMING[naming];
  BRATS_MODALITIES.forEach((m, c) => {
    if (!chosen.images[c]) {
      const expected = path.join(dir, `${id}${separator}${modalities[m]}.nii.gz`);
      throw new BratsError('missing-file', id, expected, `missing ${m} modality: ${expected} (or .nii) not found`, expected);
    }
  });
  if (!chosen.seg && requireSeg) {
    const expected = path.join(dir, `${id}${separator}${seg}.nii.gz`);
    // Some releases misname a segmentation (BraTS 2020's case 355: W39_1998.09.19_Segm.nii):
    // naming the folder's other NIfTI files shows it, and the rename that makes it read.
    const mine = new Set([...chosen.images, chosen.seg].filter((f): f is string => f !== undefined).map((f) => path.basename(f)));
    const others = files.filter((name) => !mine.has(name));
    // (.nii for an uncompressed file: a .nii.gz name would not make it gzipped.)
    const rename = `${id}${separator}${seg}${others.every((name) => /\.nii$/i.test(name)) ? '.nii' : '.nii.gz'}`;
    const hint = others.length > 0 ? `; the folder also holds ${listSkipped(others)}: if one is the segmentation, rename it ${rename}` : '';
    throw new BratsError('missing-file', id, expected, `missing segmentation: ${expected} (or .nii) not found${hint}`, expected);
  }
  return {
    id,
    dir,
    naming,
    images: chosen.images as [string, string, string, string],
    ...(chosen.seg ? { seg: chosen.seg } : {}),
  };
}

/** Every file of a case: the four modalities, then the segmentation if any. */
export function bratsCaseFiles(c: BratsCase): string[] {
  return c.seg ? [...c.images, c.seg] : [...c.images];
}

// ---------------------------------------------------------------------------
// Loading

/** Where a voxel grid sits in the world: what is needed to put predictions back. */
export interface VolumeGeometry {
  /** NIfTI dims [nx, ny, nz] = [W, H, D]. */
  dims: Vec3;
  affine: Matrix4;
  spacing: Vec3;
}

/** A case in memory, full size, before preprocessing. */
export interface BratsVolume extends VolumeGeometry {
  id: string;
  /** [t1, t1ce, t2, flair] intensities, layout [C, D, H, W] (= four NIfTI volumes back to back). */
  images: Float32Array;
  /** Labels 0..3 (4 mapped to 3), layout [D, H, W]. */
  seg?: Uint8Array;
  /** Header of the t1 file (of the first modality with an orientation, when the t1 has none): copy it when writing predictions so the geometry is bit-identical. */
  header: NiftiHeader;
}

/**
 * How far apart (mm) two files of a case may put the same voxel and still count as one
 * grid. Tools writing the same grid disagree in the last float32 bits (~1e-5 mm), and a
 * re-saved segmentation can be off by a few hundredths of a mm; a real misregistration is
 * a voxel or more. BraTS voxels are 1 mm, so a tenth of a mm changes no voxel's tissue.
 */
export const BRATS_GEOMETRY_TOLERANCE_MM = 0.1;

export interface LoadOptions {
  /** Largest distance in mm between where two files of the case put one voxel (default BRATS_GEOMETRY_TOLERANCE_MM). */
  geometryTolerance?: number;
  /**
   * When given, a segmentation that cannot be used (unreadable, on another grid, labels
   * outside its release's) is handed to this function and left out instead of failing the
   * case: for prediction, which needs the images only.
   */
  onBadSeg?: (error: Error) => void;
  /** How the segmentation's numbers are read (default 'brats': by the file names' release). */
  labelScheme?: BratsLabelScheme;
}

/** Reads a case's files and checks that they share one voxel grid. Throws BratsError. */
export async function loadBratsCase(c: BratsCase, options: LoadOptions = {}): Promise<BratsVolume> {
  const tolerance = options.geometryTolerance ?? BRATS_GEOMETRY_TOLERANCE_MM;
  if (!(tolerance >= 0)) throw new RangeError(`geometryTolerance ${tolerance} must be a number of mm >= 0`);
  // Read the segmentation alongside the images; its failure is only seen (and judged) below.
  const segRead = c.seg ? readNifti(c.seg) : undefined;
  segRead?.catch(() => undefined);
  const volumes = await Promise.all(c.images.map((file) => readNifti(file)));
  // The case's grid is the first modality's (t1) that has an orientation. A file without one
  // (qform and sform codes 0, a failed conversion) is on the grid by its dims only: taken as
  // the reference, it would give predictions no world geometry while the case's other files
  // have one, and leave those others compared with nothing (checkSameGrid skips it).
  const reference = volumes.find(hasOrientation) ?? volumes[0];
  const dims = spatialDims(c.id, reference);
  for (const volume of volumes) if (volume !== reference) checkSameGrid(c.id, reference, volume, tolerance);
  const voxels = dims[0] * dims[1] * dims[2];
  const images = new Float32Array(BRATS_CHANNELS * voxels);
  for (let ch = 0; ch < BRATS_CHANNELS; ch++) {
    const data = volumes[ch].data;
    for (let i = 0; i < voxels; i++) {
      if (!Number.isFinite(data[i])) {
        throw new BratsError('bad-intensity', c.id, volumes[ch].path, `value ${data[i]} at voxel ${i} of ${volumes[ch].path} is not finite`, data[i]);
      }
    }
    images.set(data.subarray(0, voxels), ch * voxels);
  }
  const result: BratsVolume = {
    id: c.id,
    dims,
    affine: reference.affine,
    spacing: reference.spacing,
    images,
    header: reference.header,
  };
  if (c.seg && segRead) {
    try {
      const seg = await segRead;
      checkSameGrid(c.id, reference, seg, tolerance);
      result.seg = mapBratsLabels(seg.data, c.id, c.seg, c.naming, options.labelScheme);
    } catch (error) {
      if (!options.onBadSeg || !(error instanceof Error)) throw error;
      options.onBadSeg(error);
    }
  }
  return result;
}

function spatialDims(id: string, volume: NiftiVolume): Vec3 {
  if (volume.dims.length !== 3) {
    throw new BratsError('bad-dims', id, volume.path, `${volume.path} has dims [${volume.dims.join(', ')}]; BraTS volumes are 3D`, volume.dims);
  }
  return [volume.dims[0], volume.dims[1], volume.dims[2]];
}

/** A file with neither qform nor sform has no world geometry, only the Analyze fallback affine. */
export function hasOrientation(volume: NiftiVolume): boolean {
  return volume.header.qformCode > 0 || volume.header.sformCode > 0;
}

/**
 * The largest distance (mm) between where two affines put one voxel of a grid of `dims`:
 * the distance is linear in the voxel index, so its maximum is at a corner of the grid.
 */
export function gridDistance(a: Matrix4, b: Matrix4, dims: readonly number[]): number {
  let worst = 0;
  for (let corner = 0; corner < 8; corner++) {
    const v = [0, 1, 2].map((axis) => ((corner >> axis) & 1 ? dims[axis] - 1 : 0));
    let squares = 0;
    for (let r = 0; r < 3; r++) {
      const d = (a[r][0] - b[r][0]) * v[0] + (a[r][1] - b[r][1]) * v[1] + (a[r][2] - b[r][2]) * v[2] + (a[r][3] - b[r][3]);
      squares += d * d;
    }
    worst = Math.max(worst, Math.sqrt(squares));
  }
  return worst;
}

function checkSameGrid(id: string, reference: NiftiVolume, other: NiftiVolume, toleranceMm: number): void {
  const dims = spatialDims(id, other);
  if (dims.some((n, axis) => n !== reference.dims[axis])) {
    throw new BratsError(
      'mismatched-dims',
      id,
      other.path,
      `${other.path} has dims [${dims.join(', ')}] but ${reference.path} has [${reference.dims.join(', ')}]`,
      dims,
    );
  }
  // Without an orientation there is nothing to compare: same dims can only mean the same grid.
  if (!hasOrientation(reference) || !hasOrientation(other)) return;
  const distance = gridDistance(reference.affine, other.affine, dims);
  if (distance <= toleranceMm) return;
  const [r, col] = largestAffineDifference(reference.affine, other.affine);
  throw new BratsError(
    'mismatched-affine',
    id,
    other.path,
    `${other.path} has affine[${r}][${col}] = ${other.affine[r][col]} but ${reference.path} has ${reference.affine[r][col]}: ` +
      `they put a voxel up to ${formatMm(distance)} mm apart, more than the tolerance of ${toleranceMm} mm, so the files are not on one grid ` +
      `(if they are meant to be, allow it with --geometry-tolerance <mm> of cmseg prepare, train, predict or eval)`,
    other.affine,
  );
}

/** The [row, column] of the affine entry in which a and b differ most (what a grid-mismatch message names). */
export function largestAffineDifference(a: Matrix4, b: Matrix4): [number, number] {
  let worst: [number, number] = [0, 0];
  for (let r = 0; r < 3; r++) {
    for (let col = 0; col < 4; col++) {
      if (Math.abs(a[r][col] - b[r][col]) > Math.abs(a[worst[0]][worst[1]] - b[worst[0]][worst[1]])) worst = [r, col];
    }
  }
  return worst;
}

function formatMm(mm: number): string {
  return mm >= 0.01 ? mm.toFixed(2) : mm.toPrecision(2);
}

/**
 * BraTS labels to our classes 0..3 (scheme 'brats'; 'peds2024' reads BraTS-PEDs 2024 files,
 * see the top of this file): 0, 1, 2 unchanged, enhancing tumour to 3. Which labels a
 * file may hold depends on its release (`naming`): 2018-2021 files have ET = 4 and no 3;
 * 2023 files have ET = 3, and a 4 there is some other structure (BraTS 2024
 * post-treatment: the resection cavity) that must not be trained as tumour. Without a
 * naming, 3 and 4 are both read as ET unless a file holds both. Any other value (or a
 * non-integer) is an error naming the file and voxel.
 */
export function mapBratsLabels(values: ArrayLike<number>, caseId: string, filePath: string, naming?: BratsNaming, scheme: BratsLabelScheme = 'brats'): Uint8Array {
  if (scheme === 'peds2024') return mapPeds2024Labels(values, caseId, filePath, naming);
  if (scheme !== 'brats') throw new RangeError(`label scheme ${JSON.stringify(scheme)} must be one of ${BRATS_LABEL_SCHEMES.join(', ')}`);
  const out = new Uint8Array(values.length);
  let first3 = -1;
  let first4 = -1;
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (v === 0 || v === 1 || v === 2) out[i] = v;
    else if (v === BRATS_ENHANCING_LABEL) {
      out[i] = BRATS_ENHANCING_LABEL;
      if (first3 < 0) first3 = i;
    } else if (v === BRATS_ENHANCING_LABEL_2021) {
      out[i] = BRATS_ENHANCING_LABEL;
      if (first4 < 0) first4 = i;
    } else {
      const allowed = naming === '2021' ? '0, 1, 2, 4 in BraTS 2018-2021 files' : naming === '2023' ? '0, 1, 2, 3 in BraTS 2023 files' : '0, 1, 2, 3, 4';
      throw new BratsError('bad-label', caseId, filePath, `label ${v} at voxel ${i} of ${filePath} is not a BraTS label (${allowed})`, v);
    }
  }
  const where = (label: number, first: number) => `label ${label} at voxel ${first} of ${filePath} (${countOf(values, label)} voxels)`;
  if (naming === '2023' && first4 >= 0) {
    throw new BratsError(
      'bad-label',
      caseId,
      filePath,
      `${where(4, first4)} is not a BraTS 2023 label: files with 2023 names (ID-seg.nii.gz) use 1 necrotic core (NCR), 2 edema (ED), ` +
        `3 enhancing tumour (ET), so a 4 is something else (BraTS 2024 post-treatment: resection cavity) that cmseg does not train; relabel it or leave the case out. ` +
        `If these are BraTS-PEDs 2024 (pediatric) files, numbered 1 ET, 2 NET, 3 CC, 4 ED, say so: cmseg prepare --label-scheme peds2024`,
      4,
    );
  }
  if (naming === '2021' && first3 >= 0) {
    throw new BratsError(
      'bad-label',
      caseId,
      filePath,
      `${where(3, first3)} is not a BraTS 2018-2021 label: files with 2018-2021 names (ID_seg.nii.gz) use 1 necrotic core (NCR), 2 edema (ED), ` +
        `4 enhancing tumour (ET) and no 3, which would be merged into ET; if this file numbers ET 3 (the 2023 convention), give the case 2023 names (ID-t1n ... ID-seg)`,
      3,
    );
  }
  if (naming === undefined && first3 >= 0 && first4 >= 0) {
    throw new BratsError('bad-label', caseId, filePath, `${filePath} holds both 3 and 4 (${where(4, first4)}): enhancing tumour is one of them, never both`, 4);
  }
  return out;
}

/**
 * A BraTS-PEDs 2024 segmentation (1 ET, 2 NET, 3 CC, 4 ED) as our classes 0..3
 * (BRATS_PEDS_2024_CLASSES). Its files have 2023 names: 2018-2021 names are an error (a
 * 2018-2021 file's 4 is enhancing tumour, read here as edema), and so is any other value.
 */
function mapPeds2024Labels(values: ArrayLike<number>, caseId: string, filePath: string, naming?: BratsNaming): Uint8Array {
  if (naming === '2021') {
    throw new BratsError(
      'bad-label',
      caseId,
      filePath,
      `${filePath} has a BraTS 2018-2021 name (ID_seg), but the label scheme peds2024 reads BraTS-PEDs 2024 files, which have 2023 names (ID-seg.nii.gz); ` +
        `a 2018-2021 file numbers 4 enhancing tumour, which peds2024 would read as edema: leave out --label-scheme peds2024 for these files`,
      naming,
    );
  }
  const out = new Uint8Array(values.length);
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    // (v >= 0 && v <= 4 alone would let 1.5 through; a table lookup of a non-integer is undefined.)
    const c = Number.isInteger(v) ? BRATS_PEDS_2024_CLASSES[v] : undefined;
    if (c === undefined) {
      throw new BratsError(
        'bad-label',
        caseId,
        filePath,
        `label ${v} at voxel ${i} of ${filePath} is not a BraTS-PEDs 2024 label (0, 1 ET, 2 NET, 3 CC, 4 ED: label scheme peds2024)`,
        v,
      );
    }
    out[i] = c;
  }
  return out;
}

/**
 * Our classes 0..3 as the labels of a segmentation file of `naming` and `scheme`, for writing
 * predictions: ET is 4 in 2018-2021 files; BraTS-PEDs 2024 files get 1 ET, 2 NET (our
 * non-enhancing core, NET and CC in one), 4 ED, and never 3 (CC cannot be told from NET).
 * Values >= 4 (none in a BraTS map) are kept as they are.
 */
export function releaseBratsLabels(labels: Uint8Array, naming: BratsNaming, scheme: BratsLabelScheme = 'brats'): Uint8Array {
  if (scheme === 'peds2024') return labels.map((x) => (x < BRATS_PEDS_2024_RELEASE.length ? BRATS_PEDS_2024_RELEASE[x] : x));
  if (naming === '2021') return labels.map((x) => (x === BRATS_ENHANCING_LABEL ? BRATS_ENHANCING_LABEL_2021 : x));
  return labels;
}

function countOf(values: ArrayLike<number>, label: number): number {
  let n = 0;
  for (let i = 0; i < values.length; i++) if (values[i] === label) n++;
  return n;
}

// ---------------------------------------------------------------------------
// Preprocessing

/** A box in [D, H, W] voxel coordinates: z0..z0+d-1, y0..y0+h-1, x0..x0+w-1. */
export interface CropBox {
  z0: number;
  y0: number;
  x0: number;
  d: number;
  h: number;
  w: number;
}

/** NIfTI dims [nx, ny, nz] as our extent {d: nz, h: ny, w: nx}. */
export function extentOfDims(dims: readonly number[]): Extent {
  return { d: dims[2], h: dims[1], w: dims[0] };
}

/** Our extent as NIfTI dims [nx, ny, nz]. */
export function dimsOfExtent(extent: Extent): Vec3 {
  return [extent.w, extent.h, extent.d];
}

/** Brain mask: 1 where any channel is non-zero (BraTS images are skull-stripped, background exactly 0). */
export function brainMask(images: Float32Array, channels: number): Uint8Array {
  const voxels = images.length / channels;
  const mask = new Uint8Array(voxels);
  for (let c = 0; c < channels; c++) {
    const base = c * voxels;
    for (let i = 0; i < voxels; i++) if (images[base + i] !== 0) mask[i] = 1;
  }
  return mask;
}

/**
 * Smallest box holding every non-zero voxel of `mask` (and of `seg`, so that no label is
 * ever cropped away), grown by `margin` voxels per side and clamped to the volume.
 * Undefined when both are empty.
 */
export function boundingBox(mask: Uint8Array, extent: Extent, margin = 0, seg?: Uint8Array): CropBox | undefined {
  const { d, h, w } = extent;
  let zMin = d, yMin = h, xMin = w, zMax = -1, yMax = -1, xMax = -1;
  for (let z = 0, i = 0; z < d; z++) {
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++, i++) {
        if (mask[i] === 0 && !(seg && seg[i] !== 0)) continue;
        if (z < zMin) zMin = z;
        if (z > zMax) zMax = z;
        if (y < yMin) yMin = y;
        if (y > yMax) yMax = y;
        if (x < xMin) xMin = x;
        if (x > xMax) xMax = x;
      }
    }
  }
  if (zMax < 0) return undefined;
  const lo = (v: number) => Math.max(0, v - margin);
  const z0 = lo(zMin), y0 = lo(yMin), x0 = lo(xMin);
  return {
    z0,
    y0,
    x0,
    d: Math.min(d - 1, zMax + margin) - z0 + 1,
    h: Math.min(h - 1, yMax + margin) - y0 + 1,
    w: Math.min(w - 1, xMax + margin) - x0 + 1,
  };
}

function checkCrop(crop: CropBox, extent: Extent): void {
  const ok =
    [crop.z0, crop.y0, crop.x0, crop.d, crop.h, crop.w].every(Number.isInteger) &&
    crop.z0 >= 0 && crop.y0 >= 0 && crop.x0 >= 0 && crop.d >= 1 && crop.h >= 1 && crop.w >= 1 &&
    crop.z0 + crop.d <= extent.d && crop.y0 + crop.h <= extent.h && crop.x0 + crop.w <= extent.w;
  if (!ok) {
    throw new BratsError('bad-crop', '', '', `crop box ${JSON.stringify(crop)} does not fit a ${extent.d}x${extent.h}x${extent.w} volume`, crop);
  }
}

type VoxelArray = Float32Array | Uint8Array | Int16Array | Uint16Array;

function sameKind<T extends VoxelArray>(like: T, length: number): T {
  return new (like.constructor as new (n: number) => T)(length);
}

/** The part of `data` ([channels, D, H, W] over `extent`) inside `crop`. */
export function cropVolume<T extends VoxelArray>(data: T, extent: Extent, crop: CropBox, channels = 1): T {
  checkCrop(crop, extent);
  const { d, h, w } = extent;
  if (data.length !== channels * d * h * w) {
    throw new RangeError(`cropVolume: ${data.length} values, expected ${channels}x${d}x${h}x${w}`);
  }
  const out = sameKind(data, channels * crop.d * crop.h * crop.w);
  let o = 0;
  for (let c = 0; c < channels; c++) {
    for (let z = 0; z < crop.d; z++) {
      for (let y = 0; y < crop.h; y++) {
        const start = ((c * d + crop.z0 + z) * h + crop.y0 + y) * w + crop.x0;
        (out as Float32Array).set((data as Float32Array).subarray(start, start + crop.w), o);
        o += crop.w;
      }
    }
  }
  return out;
}

/**
 * Inverse of cropVolume: a full-size [channels, D, H, W] array over `extent` with `data`
 * put back inside `crop` and `fill` elsewhere. Use it to return a prediction made on the
 * cropped case to the original grid, then write it with the original affine/header.
 */
export function uncropVolume<T extends VoxelArray>(data: T, crop: CropBox, extent: Extent, channels = 1, fill = 0): T {
  checkCrop(crop, extent);
  if (data.length !== channels * crop.d * crop.h * crop.w) {
    throw new RangeError(`uncropVolume: ${data.length} values, expected ${channels}x${crop.d}x${crop.h}x${crop.w}`);
  }
  const { d, h, w } = extent;
  const out = sameKind(data, channels * d * h * w);
  if (fill !== 0) out.fill(fill);
  let i = 0;
  for (let c = 0; c < channels; c++) {
    for (let z = 0; z < crop.d; z++) {
      for (let y = 0; y < crop.h; y++) {
        const start = ((c * d + crop.z0 + z) * h + crop.y0 + y) * w + crop.x0;
        (out as Float32Array).set((data as Float32Array).subarray(i, i + crop.w), start);
        i += crop.w;
      }
    }
  }
  return out;
}

/** Affine of the cropped grid: voxel (0, 0, 0) of the crop is voxel (x0, y0, z0) of the original. */
export function croppedAffine(affine: Matrix4, crop: CropBox): Matrix4 {
  const shift = [crop.x0, crop.y0, crop.z0];
  return affine.map((row, r) =>
    r === 3 ? [...row] : [row[0], row[1], row[2], row[3] + row[0] * shift[0] + row[1] * shift[1] + row[2] * shift[2]],
  ) as Matrix4;
}

export interface ChannelStats {
  /** Mean and (population) standard deviation over the brain mask, before normalisation. */
  mean: number;
  std: number;
}

/**
 * In place: each channel becomes (v - mean) / std over the voxels where mask = 1, and 0
 * elsewhere. A channel that is constant in the brain is only shifted (std taken as 1).
 */
export function zScoreInMask(images: Float32Array, mask: Uint8Array, channels: number): ChannelStats[] {
  const voxels = mask.length;
  if (images.length !== channels * voxels) {
    throw new RangeError(`zScoreInMask: ${images.length} values, expected ${channels} x ${voxels}`);
  }
  let count = 0;
  for (let i = 0; i < voxels; i++) count += mask[i];
  const stats: ChannelStats[] = [];
  for (let c = 0; c < channels; c++) {
    const base = c * voxels;
    let sum = 0;
    for (let i = 0; i < voxels; i++) if (mask[i]) sum += images[base + i];
    const mean = count > 0 ? sum / count : 0;
    // Two passes: the one-pass formula loses digits for MR intensities in the thousands.
    let squares = 0;
    for (let i = 0; i < voxels; i++) {
      if (mask[i]) {
        const dv = images[base + i] - mean;
        squares += dv * dv;
      }
    }
    const std = count > 0 ? Math.sqrt(squares / count) : 0;
    const scale = std > 1e-8 ? 1 / std : 1;
    for (let i = 0; i < voxels; i++) {
      images[base + i] = mask[i] ? (images[base + i] - mean) * scale : 0;
    }
    stats.push({ mean, std });
  }
  return stats;
}

export interface PreprocessOptions {
  /** Voxels of context kept around the brain's bounding box (default 0, as nnU-Net). */
  margin?: number;
}

/** A case ready for training: cropped, normalised, and remembering where it came from. */
export interface PreprocessedBratsCase {
  id: string;
  /** [C, D, H, W] of the cropped case. */
  shape: [number, number, number, number];
  extent: Extent;
  /** z-scored intensities, layout [C, D, H, W]; 0 outside the brain. */
  images: Float32Array;
  /** Labels 0..3, layout [D, H, W]. */
  seg?: Uint8Array;
  /** Brain mask of the cropped case, layout [D, H, W]. */
  brainMask: Uint8Array;
  /** Where the crop sits in the original grid. */
  crop: CropBox;
  /** The original grid: uncropVolume(x, crop, extentOfDims(original.dims)) then write with original.affine. */
  original: VolumeGeometry;
  /** Per-channel statistics used for the z-score. */
  stats: ChannelStats[];
}

/**
 * The modalities of a preprocessed case that are zero at every voxel of its brain mask (mean
 * and std 0 before normalisation: a sum of squares of non-zero float32 values is never 0).
 * zScoreInMask keeps such a channel at zeros, which is deliberate (a missing sequence stored
 * as an empty volume), but the case then has nothing to learn from that modality: worth a note.
 */
export function emptyModalities(stats: readonly ChannelStats[]): BratsModality[] {
  return BRATS_MODALITIES.filter((_, c) => stats[c] !== undefined && stats[c].mean === 0 && stats[c].std === 0);
}

/**
 * The note for a case with empty modalities (emptyModalities), naming their files; undefined
 * when there are none. `cmseg prepare` says it for training cases, predict and eval --data for
 * the cases they read: a model given an empty sequence predicts from the other three.
 */
export function emptyModalitiesNote(c: BratsCase, stats: readonly ChannelStats[]): string | undefined {
  const empty = emptyModalities(stats);
  if (empty.length === 0) return undefined;
  const files = empty.map((m) => path.basename(c.images[BRATS_MODALITIES.indexOf(m)]));
  return (
    `case ${c.id}: the ${empty.join(', ')} ${empty.length === 1 ? 'modality is' : 'modalities are'} zero everywhere in the brain (${files.join(', ')}); ` +
    'kept as zeros, so the model gets nothing from it for this case: check the file if it should hold an image'
  );
}

/** Brain mask, crop to its bounding box (+ margin), z-score per modality over the mask. */
export function preprocessBratsCase(volume: BratsVolume, options: PreprocessOptions = {}): PreprocessedBratsCase {
  const margin = options.margin ?? 0;
  if (!Number.isInteger(margin) || margin < 0) throw new RangeError(`margin ${margin} must be an integer >= 0`);
  const extent = extentOfDims(volume.dims);
  const fullMask = brainMask(volume.images, BRATS_CHANNELS);
  // Checked on the mask itself: the crop box also takes in the segmentation's voxels, so a
  // case of four empty images (a failed conversion) with a segmentation was cropped to its
  // tumour and cached as zeros labelled tumour.
  if (!fullMask.includes(1)) {
    let tumour = 0;
    if (volume.seg) for (let i = 0; i < volume.seg.length; i++) if (volume.seg[i] !== 0) tumour++;
    const segNote = tumour > 0 ? ` (the segmentation labels ${tumour} tumour voxels, but there is no image to learn them from)` : '';
    throw new BratsError('empty-brain', volume.id, volume.id, `every modality is zero everywhere: no brain to normalise${segNote}`, 0);
  }
  const crop = boundingBox(fullMask, extent, margin, volume.seg)!;
  const images = cropVolume(volume.images, extent, crop, BRATS_CHANNELS);
  const mask = cropVolume(fullMask, extent, crop);
  const stats = zScoreInMask(images, mask, BRATS_CHANNELS);
  const croppedExtent: Extent = { d: crop.d, h: crop.h, w: crop.w };
  const result: PreprocessedBratsCase = {
    id: volume.id,
    shape: [BRATS_CHANNELS, crop.d, crop.h, crop.w],
    extent: croppedExtent,
    images,
    brainMask: mask,
    crop,
    original: { dims: [...volume.dims] as Vec3, affine: volume.affine, spacing: volume.spacing },
    stats,
  };
  if (volume.seg) result.seg = cropVolume(volume.seg, extent, crop);
  return result;
}
