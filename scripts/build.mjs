#!/usr/bin/env node
// Builds dist/fleetlet: one executable holding every part and dependency.
//
//   cli/main.ts       --esbuild (cjs, node20)--> dist/fleetlet.cjs        (part `all`: every command)
//   cli/main-agent.ts --esbuild (cjs, node20)--> dist/fleetlet-agent.cjs  (part `agent`)
//   each part --V8 code cache (this node)--> dist/fleetlet[-agent].cache
//   cli/sea-main.ts   --esbuild--> dist/sea-main.cjs (the SEA main: picks a part, compiles it)
//   sea-main + parts + caches + classic-level.node --node --experimental-sea-config--> dist/sea-prep.blob
//   copy of this node binary, stripped, + blob --postject--> dist/fleetlet
//
// See docs/build.md for the reasons behind each step.
import { execFileSync, spawnSync } from 'node:child_process';
import { chmodSync, copyFileSync, existsSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import vm from 'node:vm';
import { describeFinding, scanBundle } from './bundle-scan.mjs';
import { acquireLock } from './dist-lock.mjs';

const require = createRequire(import.meta.url);
const esbuild = require('esbuild');

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const DIST = join(ROOT, 'dist');
const BUNDLE = join(DIST, 'fleetlet.cjs');
const SEA_MAIN = join(DIST, 'sea-main.cjs');
/** Must match HEAD/TAIL in cli/sea-main.ts: the code cache is made from exactly this text. */
const WRAP_HEAD = '(function (exports, require, module, __filename, __dirname) {';
const WRAP_TAIL = '\n})';
const BLOB = join(DIST, 'sea-prep.blob');
const SEA_CONFIG = join(DIST, 'sea-config.json');
const OUT = join(DIST, 'fleetlet');
const SEA_FUSE = 'NODE_SEA_FUSE_fce680ab2cc467b6e072b8b5df1996b2';
const NATIVE_TS = join(ROOT, 'core', 'native.ts');
const CLASSIC_LEVEL_DIR = join(ROOT, 'node_modules', 'classic-level');

/**
 * Optional dependencies that packages reach for behind try/catch or feature checks and
 * that this runtime never needs on Linux. Left external they would be `require`d by the
 * SEA main script, which only loads built-ins: Node prints a warning at every start.
 * Resolving them to an empty module keeps the package's own fallback path.
 * Each entry must say why it is safe to drop.
 */
const STUBBED = {
  'supports-color': 'debug (used by mqtt, coap) tries it for 256-colour DEBUG output and falls back to 6 colours',
  bufferutil: 'ws (mqtt over WebSocket) native speed-up for masking; ws has a pure-JS fallback',
  'utf-8-validate': 'ws native UTF-8 check; ws falls back to buffer.isUtf8 / a JS check',
  'osx-temperature-sensor': 'systeminformation, macOS only; never reached on Linux',
  'macos-temperature-sensor': 'systeminformation, macOS only; never reached on Linux',
  'cbor-extract':
    'cbor-x (gateway, sim) tries this native string-extraction speed-up in try/catch and falls back to its pure-JS decoder; bundled, its node-gyp-build did a computed require() from disk and `fleetlet gateway`/`sim` printed the SEA warning at every start',
};

/**
 * The parts of the binary (cli/sea-main.ts picks one per process). `stub` lists modules
 * left out of that part on top of STUBBED, each with the reason it is never reached there.
 */
const PARTS = [
  { name: 'all', entry: join(ROOT, 'cli', 'main.ts'), out: BUNDLE, meta: 'meta.json', stub: {} },
  {
    name: 'agent',
    entry: join(ROOT, 'cli', 'main-agent.ts'),
    out: join(DIST, 'fleetlet-agent.cjs'),
    meta: 'meta-agent.json',
    stub: {
      systeminformation:
        'in the binary the agent collects its inventory in a child process (`fleetlet agent inventory`, agent/metrics.ts), which cli/sea-main.ts runs from the `all` part',
    },
  },
];

const started = Date.now();
const pkg = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8'));

function log(msg) {
  process.stdout.write(`build: ${msg}\n`);
}

function fail(msg) {
  process.stderr.write(`build: FAILED: ${msg}\n`);
  process.exit(1);
}

function isMusl() {
  // glibcVersionRuntime is absent from the report on musl (Alpine) systems
  const header = /** @type {{ glibcVersionRuntime?: string }} */ (process.report?.getReport?.()?.header ?? {});
  return process.platform === 'linux' && !header.glibcVersionRuntime;
}

/** The prebuilt classic-level addon that matches the node binary we are packaging. */
function pickClassicLevelPrebuild() {
  const dir = join(CLASSIC_LEVEL_DIR, 'prebuilds', `${process.platform}-${process.arch}`);
  if (!existsSync(dir)) fail(`no classic-level prebuild for ${process.platform}-${process.arch} in ${dir}`);
  const files = readdirSync(dir).filter((f) => f.endsWith('.node'));
  const musl = isMusl();
  // node-gyp-build names variants with dot-separated tags (classic-level.musl.node,
  // classic-level.armv7.node); keep those that match this libc and ARM version
  const armVersion = String(process.config?.variables?.arm_version ?? '');
  const fits = files.filter((f) => {
    const tags = f.split('.').slice(1, -1);
    if (tags.includes('musl') !== musl) return false;
    const arm = tags.find((t) => /^armv\d+$/.test(t));
    if (arm && process.arch === 'arm' && armVersion && arm !== `armv${armVersion}`) return false;
    return true;
  });
  if (fits.length === 0) fail(`no classic-level prebuild in ${dir} fits (musl=${musl}, arm=${armVersion || '-'}): ${files.join(', ')}`);
  // the untagged/shortest name is the generic build
  fits.sort((a, b) => a.length - b.length);
  return join(dir, fits[0]);
}

/** classic-level's binding.js asks node-gyp-build for a file on disk; inside the binary the addon is an SEA asset. */
const classicLevelBindingPlugin = {
  name: 'fleetlet-classic-level-binding',
  setup(build) {
    const bindingPath = join(CLASSIC_LEVEL_DIR, 'binding.js');
    const filter = new RegExp(`^${bindingPath.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&')}$`);
    build.onLoad({ filter }, () => ({
      contents: `module.exports = require(${JSON.stringify(NATIVE_TS)}).classicLevelBinding();\n`,
      resolveDir: CLASSIC_LEVEL_DIR,
      loader: 'js',
    }));
  },
};

/**
 * zod's index re-exports every locale (`z.locales.*`, ~70 modules, ~300 KB of the bundle)
 * and evaluates them all with zod itself, in every process that validates anything. No
 * fleetlet code calls `z.config(z.locales.xx())`; zod's default English messages come from
 * `locales/en.js`, which its schemas import directly. So the locale index is cut down to
 * English only (`z.locales.en` stays). If a part ever needs another language, add it here.
 */
const ZOD_LOCALES_KEPT = ['en'];
const zodLocalesPlugin = {
  name: 'fleetlet-zod-locales',
  setup(build) {
    const index = join(ROOT, 'node_modules', 'zod', 'v4', 'locales', 'index.js');
    const filter = new RegExp(`^${index.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&')}$`);
    build.onLoad({ filter }, () => ({
      contents: ZOD_LOCALES_KEPT.map((l) => `export { default as ${l} } from "./${l}.js";`).join('\n') + '\n',
      resolveDir: dirname(index),
      loader: 'js',
    }));
  },
};

/**
 * mqtt.js evaluates every transport at the first connect (WebSocket: `ws`; SOCKS proxy:
 * `socks`, `ip-address`, `smart-buffer`: ~125 KB of the bundle), whatever the URL. These
 * rewrites make each one load on its first use instead, behaviour otherwise unchanged: the
 * `ws`/`wss` stream builders become functions that require `./ws` when called, and the
 * SOCKS helper of `tcp.js`/`tls.js` is required when a `socksProxy` option is given. Each
 * rewrite must match exactly once, or the build fails (an mqtt update changed the file).
 */
const MQTT_LAZY = {
  'connect/index.js': [
    ["protocols.ws = require('./ws').streamBuilder;", "protocols.ws = (client, opts) => require('./ws').streamBuilder(client, opts);"],
    ["protocols.wss = require('./ws').streamBuilder;", "protocols.wss = (client, opts) => require('./ws').streamBuilder(client, opts);"],
  ],
  'connect/tcp.js': [['const socks_1 = __importDefault(require("./socks"));', 'const socks_1 = { get default() { return __importDefault(require("./socks")).default; } };']],
  'connect/tls.js': [['const socks_1 = __importDefault(require("./socks"));', 'const socks_1 = { get default() { return __importDefault(require("./socks")).default; } };']],
};
const mqttLazyApplied = new Set();
const mqttLazyPlugin = {
  name: 'fleetlet-mqtt-lazy-transports',
  setup(build) {
    const base = join(ROOT, 'node_modules', 'mqtt', 'build', 'lib');
    for (const [file, edits] of Object.entries(MQTT_LAZY)) {
      const path = join(base, file);
      const filter = new RegExp(`^${path.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&')}$`);
      build.onLoad({ filter }, () => {
        let text = readFileSync(path, 'utf8');
        for (const [from, to] of edits) {
          if (text.split(from).length !== 2) fail(`mqtt ${file}: expected exactly one \`${from}\` (mqttLazyPlugin): did mqtt change?`);
          text = text.replace(from, to);
        }
        mqttLazyApplied.add(file);
        return { contents: text, resolveDir: dirname(path), loader: 'js' };
      });
    }
  },
};

function stubPlugin(stubbed) {
  return {
  name: 'fleetlet-stub-optional',
  setup(build) {
    const names = Object.keys(stubbed);
    if (names.length === 0) return;
    const filter = new RegExp(`^(${names.map((n) => n.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&')).join('|')})$`);
    build.onResolve({ filter }, (args) => ({ path: args.path, namespace: 'fleetlet-stub' }));
    // Throwing on load mirrors "module not installed", the case every caller already
    // handles. esbuild caches the module record before running it, so a second require
    // returns {} instead of throwing: fine for the callers above (each is in try/catch,
    // and ws/debug require once at load), but check that before adding an entry.
    build.onLoad({ filter: /.*/, namespace: 'fleetlet-stub' }, (args) => ({
      contents: `const e = new Error(${JSON.stringify(`Cannot find module '${args.path}' (not included in the fleetlet binary)`)}); e.code = 'MODULE_NOT_FOUND'; throw e;\n`,
      loader: 'js',
    }));
  },
};
}

async function bundle(part) {
  const t0 = Date.now();
  mqttLazyApplied.clear();
  const result = await esbuild.build({
    entryPoints: [part.entry],
    outfile: part.out,
    bundle: true,
    platform: 'node',
    format: 'cjs',
    target: 'node20',
    minify: true,
    // readable stack traces in the field are worth more than the last few hundred KB
    keepNames: true,
    legalComments: 'none',
    metafile: true,
    logLevel: 'warning',
    define: {
      __FLEETLET_VERSION__: JSON.stringify(pkg.version),
      // import.meta is empty in CJS output; core/native.ts (createRequire) and node-cron
      // (reads it at load) need a real file URL
      'import.meta.url': '__fleetlet_import_meta_url',
    },
    banner: { js: `var __fleetlet_import_meta_url = require('url').pathToFileURL(__filename).href;` },
    plugins: [classicLevelBindingPlugin, zodLocalesPlugin, mqttLazyPlugin, stubPlugin({ ...STUBBED, ...part.stub })],
  });
  latin1Source(part.out);
  const inputs = Object.keys(result.metafile.inputs);
  if (!inputs.some((i) => i.endsWith('classic-level/binding.js'))) fail(`classic-level/binding.js was not in the ${part.name} part: did the LevelDB import move?`);
  const mqttMissed = Object.keys(MQTT_LAZY).filter((f) => !mqttLazyApplied.has(f));
  if (mqttMissed.length) fail(`mqtt ${mqttMissed.join(', ')} not rewritten (mqttLazyPlugin): did mqtt move its transports?`);
  if (inputs.some((i) => /zod\/v4\/locales\/(?!index\.js$|en\.js$)/.test(i))) fail('a zod locale other than en is in the bundle: did zod move its locale index? (zodLocalesPlugin)');
  log(`part ${part.name}: bundled ${inputs.length} modules into ${relative(ROOT, part.out)} (${mb(statSync(part.out).size)}) in ${Date.now() - t0} ms`);
  writeFileSync(join(DIST, part.meta), JSON.stringify(result.metafile));
}

/** The SEA main script: tiny, it only picks a part and compiles it (cli/sea-main.ts). */
async function bundleSeaMain() {
  await esbuild.build({
    entryPoints: [join(ROOT, 'cli', 'sea-main.ts')],
    outfile: SEA_MAIN,
    bundle: true,
    platform: 'node',
    format: 'cjs',
    target: 'node20',
    minify: true,
    legalComments: 'none',
    logLevel: 'warning',
  });
}

/**
 * A V8 code cache for each part, made by this node (the binary is a copy of it, so V8's
 * version and flags match; a cache it rejects only costs start-up time). Like SEA's own
 * useCodeCache it holds what V8 compiles eagerly at the top level.
 */
function codeCache(part) {
  const text = WRAP_HEAD + readFileSync(part.out, 'utf8') + WRAP_TAIL;
  const data = new vm.Script(text, { filename: `fleetlet:${part.name}.cjs` }).createCachedData();
  const file = part.out.replace(/\.cjs$/, '.cache');
  writeFileSync(file, data);
  return file;
}

/**
 * V8 keeps a script's source in the heap for lazy compilation, one byte per character
 * when every character is Latin-1, two bytes otherwise: a single '—' anywhere doubles the
 * ~2 MB bundle source to ~4 MB of heap in every process. esbuild escapes non-ASCII in
 * ordinary strings but leaves it in String.raw templates (the agent page's script) and in
 * some regular expressions of dependencies. \uXXXX means the same character in every such
 * place: string, template and regex literals, and the page JavaScript served from
 * String.raw (its non-ASCII characters sit inside JS string literals). It would not in CSS
 * (`\2014`), so a character above U+00FF inside the page's CSS fails the build instead.
 */
function latin1Source(file) {
  const text = readFileSync(file, 'utf8');
  let n = 0;
  const out = text.replace(/[^\u0000-\u00ff]/g, (ch) => {
    n++;
    return `\\u${ch.charCodeAt(0).toString(16).padStart(4, '0')}`;
  });
  if (n === 0) return;
  const page = readFileSync(join(ROOT, 'agent', 'page.ts'), 'utf8');
  const css = /PAGE_CSS\s*=\s*String\.raw`([^`]*)`/.exec(page);
  if (css && /[^\u0000-\u00ff]/.test(css[1])) fail('the agent page CSS holds a character above U+00FF: write it as a CSS escape (\\2014) in agent/page.ts');
  writeFileSync(file, out);
  log(`${relative(ROOT, file)}: escaped ${n} character(s) above U+00FF so the bundle source stays one byte per character in V8`);
}

function scan(file) {
  const text = readFileSync(file, 'utf8');
  const { nonBuiltin, dynamicCount } = scanBundle(text);
  if (nonBuiltin.length > 0) {
    for (const f of nonBuiltin) process.stderr.write(`build:   ${describeFinding(text, f)}\n`);
    fail(`${nonBuiltin.length} non-builtin require(s) left in the bundle (each prints a warning at every start of the binary): ${nonBuiltin.map((f) => f.spec).join(', ')}; bundle them, or stub them in STUBBED in scripts/build.mjs with a reason`);
  }
  log(`${relative(ROOT, file)} scan: no non-builtin require${dynamicCount ? ` (${dynamicCount} computed require(x) calls, not checkable statically)` : ''}`);
}

function mb(n) {
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}

function which(cmd) {
  const r = spawnSync('sh', ['-c', `command -v ${cmd}`], { encoding: 'utf8' });
  return r.status === 0 ? r.stdout.trim() : null;
}

async function sea(addon, assets) {
  const t0 = Date.now();
  writeFileSync(
    SEA_CONFIG,
    JSON.stringify(
      {
        main: SEA_MAIN,
        output: BLOB,
        disableExperimentalSEAWarning: true,
        useCodeCache: true,
        assets: { 'classic-level.node': addon, ...assets },
      },
      null,
      2,
    ),
  );
  const prep = spawnSync(process.execPath, ['--experimental-sea-config', SEA_CONFIG], { encoding: 'utf8', cwd: ROOT });
  if (prep.status !== 0) fail(`node --experimental-sea-config exited ${prep.status}: ${prep.stderr}${prep.stdout}`);
  log(`SEA blob ${relative(ROOT, BLOB)} (${mb(statSync(BLOB).size)}) with assets ${Object.keys(assets).join(', ')} and ${relative(ROOT, addon)} in ${Date.now() - t0} ms`);

  // postject writes in place: build under a temporary name so a failed build never
  // leaves a half-injected dist/fleetlet that looks usable
  const tmp = `${OUT}.tmp`;
  rmSync(tmp, { force: true });
  copyFileSync(process.execPath, tmp);
  chmodSync(tmp, 0o755);
  const before = statSync(tmp).size;
  const strip = which('strip');
  if (strip) {
    execFileSync(strip, [tmp]);
    log(`stripped node binary: ${mb(before)} -> ${mb(statSync(tmp).size)}`);
  } else {
    log('strip not found: binary left unstripped (about 12 MB larger)');
  }

  const t1 = Date.now();
  const { inject } = require('postject');
  // postject's LIEF complains about every section name it cannot find once `strip` has
  // rewritten the string table ("Can't find string offset for section name '.note…'");
  // the injection is unaffected (the smoke test below runs the result). It prints through
  // console.warn, bound when inject() loads its wasm module, so hold that back meanwhile.
  const warn = console.warn;
  const held = [];
  console.warn = (...args) => held.push(args.join(' '));
  try {
    await inject(tmp, 'NODE_SEA_BLOB', readFileSync(BLOB), { sentinelFuse: SEA_FUSE, overwrite: true });
  } finally {
    console.warn = warn;
  }
  const noise = /^warning: Can't find string offset for section name '\.note[^']*'$/;
  const other = held.filter((line) => !noise.test(line.trim()));
  for (const line of other) process.stderr.write(`build: postject: ${line}\n`);
  if (held.length > other.length) log(`postject: ${held.length - other.length} known LIEF warnings about stripped .note section names suppressed`);
  chmodSync(tmp, 0o755);
  rmSync(OUT, { force: true });
  // rename, not copy: a running dist/fleetlet keeps its inode
  execFileSync('mv', ['-f', tmp, OUT]);
  log(`postject in ${Date.now() - t1} ms`);
}

/** Run the binary in a bare environment: exit 0, nothing on stderr, stdout as expected. */
function smoke(args, expect) {
  const r = spawnSync(OUT, args, { encoding: 'utf8', env: { PATH: '/usr/bin:/bin' }, timeout: 30_000 });
  const what = `smoke test: ${relative(ROOT, OUT)} ${args.join(' ')}`;
  if (r.status !== 0 || !expect(r.stdout)) fail(`${what} gave exit ${r.status}, stdout ${JSON.stringify(r.stdout.slice(0, 300))}, stderr ${JSON.stringify(r.stderr)}`);
  if (r.stderr.trim() !== '') fail(`${what} wrote to stderr: ${r.stderr}`);
}

/**
 * One build at a time per tree: test files run two at a time and more than one may want
 * the binary; interleaved writes to dist/fleetlet.cjs and the blob would yield a binary
 * whose bundle does not match its scan. A lock whose owner is gone is taken over
 * (scripts/dist-lock.mjs says how two waiters cannot both take it).
 */
async function lockDist() {
  try {
    await acquireLock(join(DIST, '.build.lock'));
  } catch (err) {
    fail(err.message);
  }
}

/** `--copy-to DIR` or `--copy-to=DIR`; anything else is refused before the build starts */
function parseArgs(argv) {
  let copy = null;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--copy-to' && argv[i + 1] && !argv[i + 1].startsWith('-')) copy = argv[++i];
    else if (a.startsWith('--copy-to=') && a.length > '--copy-to='.length) copy = a.slice('--copy-to='.length);
    else fail(`unknown or incomplete argument ${JSON.stringify(a)} (usage: node scripts/build.mjs [--copy-to DIR])`);
  }
  return copy === null ? null : resolve(copy);
}
const copyTo = parseArgs(process.argv.slice(2));

mkdirSync(DIST, { recursive: true });
await lockDist();
const assets = {};
for (const part of PARTS) {
  await bundle(part);
  scan(part.out);
  assets[`${part.name}.cjs`] = part.out;
  assets[`${part.name}.cache`] = codeCache(part);
}
await bundleSeaMain();
scan(SEA_MAIN);
const addon = pickClassicLevelPrebuild();
await sea(addon, assets);
// one command from each part
smoke(['--version'], (out) => out.trim() === `fleetlet ${pkg.version}`);
smoke(['agent', '--help'], (out) => out.includes('fleetlet agent'));
const size = statSync(OUT).size;
const ms = Date.now() - started;
writeFileSync(
  join(DIST, 'build-info.json'),
  JSON.stringify(
    {
      version: pkg.version,
      file: relative(ROOT, OUT),
      size,
      parts: Object.fromEntries(PARTS.map((p) => [p.name, statSync(p.out).size])),
      node: process.version,
      platform: `${process.platform}-${process.arch}`,
      addon: relative(ROOT, addon),
      stripped: which('strip') !== null,
      buildMs: ms,
      builtAt: new Date().toISOString(),
    },
    null,
    2,
  ) + '\n',
);
log(`done: ${relative(ROOT, OUT)} ${mb(size)} (${size} bytes) in ${(ms / 1000).toFixed(1)} s`);
// `--copy-to DIR`: a copy of dist/ made under the lock, for a caller that reads the build
// while another build may rewrite dist/ (tests run two files at a time)
if (copyTo !== null) {
  mkdirSync(copyTo, { recursive: true });
  for (const name of readdirSync(DIST)) {
    if (name.startsWith('.build.lock') || !statSync(join(DIST, name)).isFile()) continue;
    copyFileSync(join(DIST, name), join(copyTo, name));
    chmodSync(join(copyTo, name), statSync(join(DIST, name)).mode & 0o777);
  }
  log(`copied dist/ to ${copyTo}`);
}
