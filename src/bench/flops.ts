// Convolution FLOPs of one training step, counted from the parameter shapes:
// forward = 2 * multiply-adds of every 3x3(x3) conv, transposed conv and 1x1
// head at its level's resolution; a step = 3 x forward (forward, backward data,
// backward weights); a prediction = 1 x forward (`passes`). The PyTorch reference counts
// the same way.

export function stepConvFlops(params: { name: string; shape: number[] }[], spatial: number[], n: number, depth: number, passes = 3): number {
  const voxelsAt = (level: number) => spatial.reduce((a, s) => a * Math.max(1, s >> level), 1);
  let forward = 0;
  for (const { name, shape } of params) {
    if (!name.endsWith('.weight') || name.includes('.norm')) continue;
    const [a, b, ...k] = shape;
    const taps = k.reduce((x, y) => x * y, 1);
    const parts = name.split('.');
    let level = 0;
    if (parts[0] === 'enc') level = Number(parts[1]);
    else if (parts[0] === 'dec') level = depth - 2 - Number(parts[1]);
    else if (parts[0] === 'up') level = depth - 1 - Number(parts[1]); // counted at its input resolution
    forward += 2 * a * b * taps * voxelsAt(level) * n;
  }
  return passes * forward;
}
