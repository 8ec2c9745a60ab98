import type { AppSpec } from './config.ts';

/**
 * Plan, then execute (STYLE.md, balena): a pure function from the apps that run to the
 * apps that should run. Each step kind has exactly one executor (Supervisor.execute);
 * a new kind does not compile until the executor map handles it.
 */
export type Step = { kind: 'start'; spec: AppSpec } | { kind: 'stop'; name: string } | { kind: 'replace'; spec: AppSpec };
export type StepKind = Step['kind'];
export type Executors = { [K in StepKind]: (step: Extract<Step, { kind: K }>) => Promise<void> };

export interface CurrentApp {
  spec: AppSpec;
}

function sameSpec(a: AppSpec, b: AppSpec): boolean {
  return JSON.stringify(a, Object.keys(a).sort()) === JSON.stringify(b, Object.keys(b).sort()) && JSON.stringify(a.env) === JSON.stringify(b.env);
}

/** Steps to go from `current` to `desired`; stops come first so resources free up before starts. */
export function planApps(current: ReadonlyMap<string, CurrentApp>, desired: readonly AppSpec[]): Step[] {
  const want = new Map(desired.map((s) => [s.name, s]));
  const steps: Step[] = [];
  for (const name of [...current.keys()].sort()) if (!want.has(name)) steps.push({ kind: 'stop', name });
  for (const spec of desired) {
    const cur = current.get(spec.name);
    if (!cur) steps.push({ kind: 'start', spec });
    else if (!sameSpec(cur.spec, spec)) steps.push({ kind: 'replace', spec });
  }
  return steps;
}
