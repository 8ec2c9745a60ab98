// Finds `require("x")` calls in a bundle whose target is not a Node built-in.
//
// Inside a Node single executable the main script's `require` can load built-in modules
// only; a package that esbuild left un-bundled (typically an optional dependency behind
// try/catch) makes Node print a long warning at every start, and fails if the code path
// is ever taken. The build refuses to produce a binary while this scan finds anything,
// and test/build/binary.test.ts runs it again on the shipped bundle.
import { builtinModules } from 'node:module';

const BUILTINS = new Set(builtinModules);

/** True when `spec` names a Node built-in (`fs`, `node:fs`, `fs/promises`, `node:test`, ...). */
export function isBuiltin(spec) {
  if (spec.startsWith('node:')) return true;
  return BUILTINS.has(spec);
}

// String-literal requires only: a computed `require(x)` cannot be decided statically
// and is reported separately as dynamic so it is at least visible.
const LITERAL_REQUIRE = /(?<![\w$.])require\(\s*(["'`])((?:(?!\1)[^\\\n]|\\.)*)\1\s*\)/g;

/**
 * Scan bundle text. Returns `{ nonBuiltin, dynamicCount }` where `nonBuiltin` lists each
 * offending specifier once with how often it occurs and the offset of its first use.
 */
export function scanBundle(text) {
  const found = new Map();
  for (const m of text.matchAll(LITERAL_REQUIRE)) {
    const spec = m[2];
    if (isBuiltin(spec)) continue;
    const seen = found.get(spec);
    if (seen) seen.count++;
    else found.set(spec, { spec, count: 1, offset: m.index ?? 0 });
  }
  const dynamicCount = (text.match(/(?<![\w$.])require\(\s*[A-Za-z_$][\w$.]*\s*\)/g) ?? []).length;
  return { nonBuiltin: [...found.values()], dynamicCount };
}

/** Human-readable description of one finding with a little surrounding bundle text. */
export function describeFinding(text, finding) {
  const from = Math.max(0, finding.offset - 80);
  const context = text.slice(from, finding.offset + 80).replace(/\s+/g, ' ');
  return `require(${JSON.stringify(finding.spec)}) x${finding.count} near: …${context}…`;
}
