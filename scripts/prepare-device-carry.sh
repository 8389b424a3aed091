#!/usr/bin/env bash
# Prepares the untracked files scripts/device-check.sh uses on a GPU machine that
# has no Node.js: the compiled TypeScript (dist/) and this machine's Node binary,
# xz-compressed into .device/ (git-ignored). Prints the `carry` list for the
# device tool's `run` and the size it adds (the tool carries at most 64 MiB).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
npx tsc -p tsconfig.json
mkdir -p .device
if [ ! -f .device/node.xz ] || [ "$(command -v node)" -nt .device/node.xz ]; then
  xz -T2 -c "$(command -v node)" >.device/node.xz.tmp && mv .device/node.xz.tmp .device/node.xz
fi
for d in node_modules/node-addon-api node_modules/node-api-headers node_modules/commander node_modules/cli-progress; do
  [ -d "$d" ] || { echo "missing $d: run npm install first" >&2; exit 1; }
done
echo 'carry: [".device", "dist", "node_modules/node-addon-api", "node_modules/node-api-headers", "node_modules/commander", "node_modules/cli-progress"]'
du -ch .device dist node_modules/node-addon-api node_modules/node-api-headers node_modules/commander node_modules/cli-progress | tail -1
