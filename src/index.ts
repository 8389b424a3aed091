// cmseg public API.
export { createModel, Model, backendInfo, setNumThreads, argmaxClasses, splitAnnotatorMaps } from './model/model';
export type { Batch, StepResult, Prediction, PredictOptions } from './model/model';
export type { ModelConfig, OptimizerOptions, LossOptions, CmMode, CmInit, Device, ResolvedConfig } from './model/config';
export type { NativeBackendInfo as BackendInfo } from './native';
export { saveCheckpoint, loadCheckpoint, readCheckpoint } from './model/checkpoint';
export type { CheckpointContents } from './model/checkpoint';
export { readSafetensors, writeSafetensors, encodeSafetensors, decodeSafetensors } from './data/safetensors';
export { readNifti, writeNifti } from './data/nifti';
export type { NiftiVolume } from './data/nifti';
export { fuse } from './fusion/fuse';
export type { FuseOptions, FuseResult, FusionMethod } from './fusion/fuse';
export { slidingWindowPredict, gaussianImportanceMap } from './model/sliding-window';
export type { SlidingWindowOptions, SlidingWindowPrediction, SlidingWindowModel } from './model/sliding-window';
