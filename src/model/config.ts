// Model, optimiser and loss options (SPEC sections 2-4), with their defaults.
// The native engine validates every value and rejects unknown keys; this file
// is the typed face of those options.

export type CmMode = 'full' | 'lowrank' | 'global';
export type CmInit = 'identity' | 'uniform';
export type Device = 'cpu' | 'cuda' | 'auto';

export interface OptimizerOptions {
  /** 'adam' adds weightDecay * w to the gradient; 'adamw' decays the weights directly. Default 'adam'. */
  kind?: 'adam' | 'adamw';
  /** Learning rate, default 1e-3. */
  lr?: number;
  /** Adam's moment decay rates, default 0.9 and 0.999. */
  beta1?: number;
  beta2?: number;
  /** Adam's epsilon, > 0 (default 1e-8). */
  eps?: number;
  /** Default 0. */
  weightDecay?: number;
}

export interface LossOptions {
  /** Trace weight lambda (SPEC section 4), default 0.01. */
  lambda?: number;
  /** Weight of the negated trace during the warm-up: at createModel, default equal to lambda; setLoss keeps the current value unless given. */
  lambdaWarmup?: number;
  /** Optimiser steps with the negated trace (paper section 2.4), default 0. */
  warmupSteps?: number;
}

export interface ModelConfig {
  /** 2 (images N, C, H, W) or 3 (volumes N, C, D, H, W). Default 2. */
  ndim?: 2 | 3;
  /** Input channels C, default 1. */
  inChannels?: number;
  /** Classes L including background (class 0), 2..16. */
  classes: number;
  /** Annotators R: one CM head each, 1..64. */
  annotators: number;
  /** U-Net levels, 1..8, default 4. Every spatial size must be divisible by 2^(depth-1). */
  depth?: number;
  /** Channels of level 0 (level k has baseChannels * 2^k), 1..1024. Default 32 in 2D, 16 in 3D. */
  baseChannels?: number;
  /** Annotator CM parameterisation (SPEC section 3), default 'full'. */
  cmMode?: CmMode;
  /** Rank l of the 'lowrank' CMs, 1..8, default 1. */
  cmRank?: number;
  /** Extra blocks in front of each CM head, 0..8, default 0 (the authors' code uses 2). */
  cmHeadBlocks?: number;
  /** 'identity' (default) starts every CM with a diagonal of about 0.8; 'uniform' uses the plain initialisation. */
  cmInit?: CmInit;
  /** Seed of the parameter initialisation, an integer in 0..2^53-1, default 0. */
  seed?: number;
  /** Backend, default 'cpu'. 'auto' picks CUDA when built and a GPU is present; 'cuda' fails clearly without one. */
  device?: Device;
  /** GPU only: let convolutions and heads use TF32 tensor cores (default true); false = strict fp32. */
  tf32?: boolean;
  /**
   * GPU only: 3x3(x3) convolutions on bfloat16 copies of their inputs and weights with fp32
   * accumulation, like torch.autocast(dtype=torch.bfloat16); parameters, activations, loss and
   * Adam stay fp32 (default false).
   */
  bf16?: boolean;
  /** GPU only: the most device memory the model may hold, in MiB (default 0: no limit); past it a step fails with "GPU out of memory". */
  gpuMemoryLimitMB?: number;
  optimizer?: OptimizerOptions;
  loss?: LossOptions;
}

/** The native model's options without the optimiser and loss settings. */
export type NetworkConfig = Omit<ModelConfig, 'optimizer' | 'loss'>;

export interface ResolvedConfig {
  ndim: 2 | 3;
  inChannels: number;
  classes: number;
  annotators: number;
  depth: number;
  baseChannels: number;
  cmMode: CmMode;
  cmRank: number;
  cmHeadBlocks: number;
  cmInit: CmInit;
  seed: number;
  /** The backend the model runs on: 'auto' resolved to 'cpu' or 'cuda' (never 'auto'). */
  device: 'cpu' | 'cuda';
  tf32: boolean;
  bf16: boolean;
  gpuMemoryLimitMB: number;
}

export function splitConfig(config: ModelConfig): { network: NetworkConfig; optimizer?: OptimizerOptions; loss?: LossOptions } {
  if (config === null || typeof config !== 'object') throw new TypeError('createModel expects a config object');
  const { optimizer, loss, ...network } = config;
  return { network, optimizer, loss };
}
