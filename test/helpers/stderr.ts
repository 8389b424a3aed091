// What a call writes on this process's stderr (notes, warnings), with its result: the CLI's
// and the trainer's messages checked by tests that call them in process.
export async function captureStderr<T>(run: () => Promise<T>): Promise<{ value: T; stderr: string }> {
  let stderr = '';
  const write = process.stderr.write.bind(process.stderr);
  process.stderr.write = ((chunk: string) => ((stderr += chunk), true)) as typeof process.stderr.write;
  try {
    return { value: await run(), stderr };
  } finally {
    process.stderr.write = write;
  }
}
