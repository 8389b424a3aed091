// Worker-thread side of the patch loader (src/data/patch-loader.ts): builds the batches it
// is asked for and posts them back with their buffers transferred. Started by PatchLoader
// (through a bootstrap that registers ts-node when this file is TypeScript).

import { parentPort, workerData } from 'worker_threads';
import { PatchSampler, type PatchWorkerInit, type PatchWorkerReply, type PatchWorkerRequest, batchTransferList } from './patch-loader';

const port = parentPort;
if (!port) throw new Error('patch-worker must run in a worker thread (it is started by PatchLoader)');

const init = workerData as PatchWorkerInit;
const sampler = new PatchSampler(init.cases, init.settings, init.names);

port.on('message', (request: PatchWorkerRequest) => {
  if (request.type !== 'batch') return;
  let reply: PatchWorkerReply;
  try {
    const batch = sampler.batch(request.index);
    reply = { type: 'batch', index: request.index, batch };
    port.postMessage(reply, batchTransferList(batch));
  } catch (err) {
    const error = err instanceof Error ? err : new Error(String(err));
    reply = { type: 'error', index: request.index, message: error.message, ...(error.stack ? { stack: error.stack } : {}) };
    port.postMessage(reply);
  }
});
