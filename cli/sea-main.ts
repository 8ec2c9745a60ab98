// The single executable's start script (scripts/build.mjs makes it the SEA `main`). The
// binary carries the command line twice, as two SEA assets compiled by esbuild:
//
//   agent.cjs  cli/main-agent.ts: `fleetlet agent …` only (the long-running device agent)
//   all.cjs    cli/main.ts: every command
//
// V8 keeps a script's whole source in the heap for as long as the process runs (lazy
// compilation needs it), and the pages of the binary it was read from stay resident. The
// agent runs on every device for months next to the apps it supervises, so it loads only
// its own part: about 0.8 MB less source, hub, gateway, simulator and the inventory
// library left out (docs/build.md). `fleetlet agent inventory` is run by the agent as a
// child process to collect the inventory with systeminformation, which lives in `all`.
//
// Each part is compiled with a V8 code cache made at build time by the same Node binary
// (the asset `<part>.cache`); a cache V8 rejects (other flags) only costs start-up time.
import { dirname } from 'node:path';
import { getAsset, getRawAsset } from 'node:sea';
import { Script } from 'node:vm';

/** Must match scripts/build.mjs, which makes the code cache from the same text. */
const HEAD = '(function (exports, require, module, __filename, __dirname) {';
const TAIL = '\n})';

const argv = process.argv.slice(2);
const part = argv[0] === 'agent' && argv[1] !== 'inventory' ? 'agent' : 'all';

let cachedData: Buffer | undefined;
try {
  cachedData = Buffer.from(getRawAsset(`${part}.cache`) as ArrayBuffer);
} catch {
  cachedData = undefined; // built without a cache
}
const script = new Script(HEAD + getAsset(`${part}.cjs`, 'utf8') + TAIL, {
  filename: `fleetlet:${part}.cjs`,
  ...(cachedData ? { cachedData } : {}),
});
const fn = script.runInThisContext() as (exports: object, req: NodeJS.Require, mod: object, filename: string, dir: string) => void;
const mod = { exports: {} as object, id: '.', filename: process.execPath, loaded: false };
fn.call(mod.exports, mod.exports, require, mod, process.execPath, dirname(process.execPath));
