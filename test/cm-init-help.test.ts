// `train --help` describes --cm-init as the model behaves: 'uniform' is the plain
// initialisation, where global CMs start at exactly 1/classes but a pixel-wise head's
// CMs come from its random initial outputs (README, "Initialisation").
import t from 'tap';
import { createModel } from '../src/index';
import { cliHelp } from './helpers/cli';

t.test("cmInit 'uniform': global CMs are exactly 1/L, pixel-wise CMs are not", async (t) => {
  const L = 3;
  const images = Float32Array.from({ length: 2 * 8 * 8 }, (_, k) => Math.sin(k));
  for (const cmMode of ['global', 'full'] as const) {
    const m = createModel({ ndim: 2, inChannels: 1, classes: L, annotators: 2, depth: 2, baseChannels: 4, cmMode, cmInit: 'uniform', seed: 3 });
    const { cms } = await m.predict(images, [2, 1, 8, 8], { cms: true });
    const worst = cms!.reduce((w, a) => Math.max(w, Math.abs(a - 1 / L)), 0);
    if (cmMode === 'global') t.ok(worst < 1e-6, `global: every entry 1/${L} (worst off by ${worst})`);
    else t.ok(worst > 1e-3, `full: entries vary with the head's random outputs (up to ${worst} from 1/${L})`);
    await m.dispose();
  }
});

t.test('train --help says so', async (t) => {
  const help = (await cliHelp(['train', '--help'])).replace(/\s+/g, ' ');
  const line = help.slice(help.indexOf('--cm-init'), help.indexOf('--train-images'));
  t.notMatch(line, /every entry 1\/classes/, `no claim that every CM starts uniform: ${line}`);
  t.match(line, /global CMs/, `names the global CMs as the exactly uniform ones: ${line}`);
});
