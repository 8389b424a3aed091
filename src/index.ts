// cmseg public API.
export { createModel, Model, backendInfo, setNumThreads, argmaxClasses, splitAnnotatorMaps } from './model/model';
export type { Batch, StepResult, Prediction, PredictOptions } from './model/model';
export type { ModelConfig, NetworkConfig, OptimizerOptions, LossOptions, CmMode, CmInit, Device, ResolvedConfig } from './model/config';
export type { NativeBackendInfo as BackendInfo, ModelMemory } from './native';
export { saveCheckpoint, loadCheckpoint, readCheckpoint } from './model/checkpoint';
export type { CheckpointContents } from './model/checkpoint';
export { readSafetensors, writeSafetensors, encodeSafetensors, decodeSafetensors } from './data/safetensors';
export type { SafeArray } from './data/safetensors';
export { readNifti, writeNifti } from './data/nifti';
export type { NiftiVolume } from './data/nifti';
export { fuse } from './fusion/fuse';
export type { FuseOptions, FuseResult, FusionMethod } from './fusion/fuse';
export { slidingWindowPredict, gaussianImportanceMap } from './model/sliding-window';
export type { Extent } from './data/morphology';
export type { SlidingWindowOptions, SlidingWindowPrediction, SlidingWindowModel } from './model/sliding-window';
export { ensemble, ensembleMismatch, ENSEMBLE_FIELDS } from './model/ensemble';
export { mirrored, mirrorings, flipSpatial } from './model/tta';
export { train, TRAIN_DEFAULTS, TrainingError, RunFolderBusyError, lockRunFolder, readTrainerState, readTrainLog, forEachTrainLogEntry, CHECKPOINT_BEST, CHECKPOINT_LAST, TRAIN_LOG, RUN_LOCK } from './train/trainer';
export type { TrainConfig, TrainHooks, TrainResult, TrainerState, TrainerExtra, ValidationCase, ValidationProgress, ValidationResult, Validator } from './train/trainer';
export type { FileLock } from './data/files';
export { createProgress, silentProgress } from './train/progress';
export type { ProgressFields, ProgressReporter } from './train/progress';
export { learningRate, SCHEDULE_KINDS } from './train/schedule';
export type { LrSchedule, ScheduleKind } from './train/schedule';
export { augmentBatch } from './train/augment';
export type { AugmentOptions } from './train/augment';
export { InMemorySource, gatherBatch } from './train/data';
export type { TrainingSource, AnnotatedBatch, AnnotatedSet } from './train/data';
export { PatchStreamSource } from './train/patch-source';
export { METHODS, METHOD_NAMES, methodBatch, methodDefinition } from './train/methods';
export type { MethodName, MethodDefinition } from './train/methods';
export { PRESETS, presetByName } from './train/presets';
export { loadExperimentData, fuseTrainingSet, MNIST_ANNOTATORS } from './train/experiment';
export type { DatasetSpec, ExperimentData, FolderDatasetSpec } from './train/experiment';
export { evaluateModel, evaluateAgainstMajority, fusedLabelRows, paddedToDepth, paddedSize } from './train/evaluate';
export type { EvaluationSummary, FusedLabelRows, InferenceModel, AnnotatedVolume, VolumeEvaluationOptions, VolumeScore, PartedSet } from './train/evaluate';
export { meanLabels, meanLabelsHard, modeLabels } from './fusion/simple';
export { evaluateSegmentation, SegmentationEvaluator, diceSummary, dicePerClass, totalDice, regionDice, fusedLabelDice, cmEstimationError, estimatedReliability, generalisedEnergyDistance, iouDistance, argmaxAnnotatorProbs, meanStd } from './eval/metrics';
export type { MeanStd, DiceSummary, SegmentationReport, EvaluationInput, CmEstimationResult, GedResult, IouMode, NonFiniteOutputs } from './eval/metrics';
export { bratsDice, bratsHausdorff95, BRATS_REGIONS } from './eval/brats-regions';
export { hausdorff95, surfaceDistances, squaredDistanceTransform } from './eval/surface-distance';
export type { BratsDiceReport, BratsRegion } from './eval/brats-regions';
export { formatSegmentationReport, formatBratsReport, formatMeanStd, formatAnnotatorCms, formatClassConfusion, classesLearntAsOthers } from './eval/report';
export type { ClassLearntAsOther, FormatOptions } from './eval/report';
export { trainingCurves, drawnPart } from './report/curves';
export { lineChart } from './report/chart';
export type { Series as ChartSeries, ChartOptions } from './report/chart';
export { cmFigure, cmHeatMaps, labelOverlay, grid } from './report/pictures';
export { simulateAnnotators, trueConfusionMatrix } from './data/annotators';
export type { AnnotatorSpec, LabelMode } from './data/annotators';
export { loadMnistSplits } from './data/mnist';
export { loadImageFolder, scanImageFolder } from './data/image-folder';
export { readPng, writePng } from './data/png';
export type { PngImage, DecodedPng } from './data/png';
export {
  discoverBratsCases,
  loadBratsCase,
  preprocessBratsCase,
  uncropVolume,
  mapBratsLabels,
  releaseBratsLabels,
  bratsClassNames,
  bratsLayoutHint,
  BRATS_MODALITIES,
  BRATS_CLASSES,
  BRATS_LABEL_SCHEMES,
  BRATS_GEOMETRY_TOLERANCE_MM,
} from './data/brats';
export type { BratsCase, BratsVolume, PreprocessedBratsCase, CropBox, BratsLabelScheme, LoadOptions as BratsLoadOptions } from './data/brats';
export { writeBratsPhantoms } from './data/brats-phantom';
export { prepareCache, readCachedCase, readCachedCaseForScoring, readCacheIndex } from './data/cache';
export type { PrepareCacheOptions, CachedCase, CacheIndex } from './data/cache';
export { PatchLoader, createPatchLoader } from './data/patch-loader';
export type { PatchLoaderOptions, PatchBatch } from './data/patch-loader';
export { bratsCaseSplits, loadBratsExperiment, imageFolderSplits, loadFolderExperiment } from './train/experiment';
export { evaluateVolumes } from './train/evaluate';

// The error classes the calls above throw, for `instanceof` (each sets `name` to its class
// name); plain Errors from the native engine carry `code` instead (CMSEG_INVALID_ARGUMENT,
// CMSEG_OUT_OF_MEMORY, CMSEG_DISPOSED, CMSEG_NATIVE_ERROR). They were thrown by exported
// functions but not exported, so a caller could only test `err.name`.
export { UserError } from './errors';
export { NiftiError } from './data/nifti';
export type { NiftiErrorKind } from './data/nifti';
export { PngError } from './data/png';
export { SafetensorsError } from './data/safetensors';
export { MissingFileError, AtomicWriteError, LockHeldError } from './data/files';
export { BratsError } from './data/brats';
export type { BratsErrorKind } from './data/brats';
export { CacheError } from './data/cache';
export type { CacheErrorKind } from './data/cache';
export { ImageFolderError } from './data/image-folder';
export { PatchLoaderError } from './data/patch-loader';

// augmentBatch and TrainingSource.batch take an Rng: a class with private state, which no
// object of the caller's can stand in for, so it is exported to be constructed (new Rng(seed)).
export { Rng } from './data/random';

// The types of the exported calls' parameters and results, so that a caller can name them
// (an options object built in one function and passed in another).
export type { PredictingModel, PredictingModelOf, ModelPrediction } from './model/ensemble';
export type { Preset } from './train/presets';
export type { MnistDatasetSpec, BratsDatasetSpec, CaseSplits, ExperimentRuntime, RunRecipe } from './train/experiment';
export type { EvaluateOptions } from './train/evaluate';
export type { PatchStream } from './train/patch-source';
export type { PatchSamplingSettings } from './data/patch-loader';
export type { NiftiImageToWrite, NiftiWriteOptions } from './data/nifti';
export type { PngEncodeOptions } from './data/png';
export type { SafeFile } from './data/safetensors';
export type { PrepareCacheResult } from './data/cache';
export type { DiscoverOptions, PreprocessOptions } from './data/brats';
export type { WriteBratsPhantomsOptions } from './data/brats-phantom';
export type { ImageFolderOptions, ImageFolderBatch, ImageFolderLayout } from './data/image-folder';
export type { MnistSplitOptions, MnistSplits } from './data/mnist';
export type { GoodSpec, OverSpec, UnderSpec, FractureSpec, WrongSpec, SimulateOptions, SimulatedAnnotations, ConfusionMatrix } from './data/annotators';
export type { CmEstimationInput, GedInput } from './eval/metrics';
export type { Dims3 } from './eval/surface-distance';
export type { CurvesOptions } from './report/curves';
export type { CmFigureLayout } from './report/pictures';
export type { FusionInput } from './fusion/simple';
export type { StapleFusion } from './fusion/fuse';
