// The training variants of SPEC section 4 (the rows of the paper's tables), each as a
// model setting plus the way a batch of annotations becomes the model's training target.

import type { CmMode } from '../model/config';
import type { Batch } from '../model/model';
import { meanLabels, modeLabels } from '../fusion/simple';
import type { AnnotatedBatch } from './data';

export type MethodName =
  | 'cm'
  | 'cm-notrace'
  | 'cm-global'
  | 'cm-lowrank'
  | 'naive-mean'
  | 'naive-mode'
  | 'naive-staple'
  | 'naive-spatial-staple'
  | 'oracle';

export interface MethodDefinition {
  name: MethodName;
  /** The row label used in reports (paper Tables 1-2 wording). */
  title: string;
  /**
   * What the model learns from ('fused': a STAPLE map made once before training: over the
   * whole in-memory training set for MNIST, per case into the cache for BraTS).
   */
  target: 'annotators' | 'mean' | 'mode' | 'fused' | 'consensus';
  /** The native fusion that prepares the 'fused' target. */
  fusion?: 'multi-staple' | 'spatial-staple';
  cmMode: CmMode;
  /** Forces the trace weight (cm-notrace: 0); otherwise the run's lambda applies. */
  lambda?: number;
  /** Whether the annotator CMs are trained and worth scoring. */
  learnsCms: boolean;
}

export const METHODS: Record<MethodName, MethodDefinition> = {
  cm: { name: 'cm', title: 'Ours (pixel-wise CMs, trace)', target: 'annotators', cmMode: 'full', learnsCms: true },
  'cm-notrace': { name: 'cm-notrace', title: 'Ours without trace', target: 'annotators', cmMode: 'full', lambda: 0, learnsCms: true },
  'cm-global': { name: 'cm-global', title: 'Ours with global CMs', target: 'annotators', cmMode: 'global', learnsCms: true },
  'cm-lowrank': { name: 'cm-lowrank', title: 'Ours with low-rank CMs', target: 'annotators', cmMode: 'lowrank', learnsCms: true },
  'naive-mean': { name: 'naive-mean', title: 'Naive CNN on mean labels', target: 'mean', cmMode: 'full', learnsCms: false },
  'naive-mode': { name: 'naive-mode', title: 'Naive CNN on mode labels', target: 'mode', cmMode: 'full', learnsCms: false },
  'naive-staple': { name: 'naive-staple', title: 'Naive CNN on STAPLE labels', target: 'fused', fusion: 'multi-staple', cmMode: 'full', learnsCms: false },
  'naive-spatial-staple': {
    name: 'naive-spatial-staple',
    title: 'Naive CNN on Spatial STAPLE labels',
    target: 'fused',
    fusion: 'spatial-staple',
    cmMode: 'full',
    learnsCms: false,
  },
  oracle: { name: 'oracle', title: 'Oracle (trained on the consensus)', target: 'consensus', cmMode: 'full', learnsCms: false },
};

export const METHOD_NAMES = Object.keys(METHODS) as MethodName[];

export function methodDefinition(name: string): MethodDefinition {
  // Own keys only: `name in METHODS` also found 'constructor', 'toString', '__proto__' on
  // Object.prototype, and a run with such a method started and failed at its first step.
  if (typeof name !== 'string' || !Object.hasOwn(METHODS, name)) {
    throw new RangeError(`unknown method ${JSON.stringify(name)}; choose one of ${METHOD_NAMES.join(', ')}`);
  }
  return METHODS[name as MethodName];
}

/** The model's batch for `method`: the CM loss on every annotator, or plain CE on one fused map. */
export function methodBatch(method: MethodDefinition, batch: AnnotatedBatch, classes: number): Batch {
  const { images, shape, labels, present } = batch;
  const count = shape[0];
  switch (method.target) {
    case 'annotators':
      return { images, shape, labels, present };
    case 'mean':
      return { images, shape, softTarget: meanLabels({ labels, present, count, classes }) };
    case 'mode':
      return { images, shape, target: modeLabels({ labels, present, count, classes }) };
    case 'fused':
      if (!batch.fused) throw new RangeError(`method '${method.name}' trains on ${method.fusion} labels, which were not prepared for this data source`);
      return { images, shape, target: batch.fused };
    case 'consensus':
      if (!batch.consensus) throw new RangeError(`method '${method.name}' needs the expert consensus, which this data source does not provide`);
      return { images, shape, target: batch.consensus };
  }
}
