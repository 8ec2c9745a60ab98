import { setFlagsFromString } from 'node:v8';

/** V8's old generation grows to this many percent above what is live before the next full collection. */
export const SERVER_HEAP_GROWING_PERCENT = 100;

/**
 * Heap tuning for the long-running relays (hub, gateway), applied once at their start.
 *
 * V8 sizes the old generation's next limit from what survived the last full (mark-compact)
 * collection, by a factor it derives from the collector's speed. In a gateway relaying
 * 10,000 MCUs (a live heap of ~46 MB and a few MB a second promoted: what waits for its
 * fsync, per-MCU state) that factor came out near 1.1: a full collection every ~1.4 s,
 * each pausing the event loop for 10-30 ms, plus incremental steps of up to 22 ms, in
 * nearly every second of the run; the MCU-to-gateway leg's p99 followed them. A fixed
 * factor of 2 (`--heap-growing-percent=100`) makes them half as frequent, for at most the
 * live size again in memory (measured: 18 instead of ~36 per run, and p99 34/42 ms instead
 * of 45-76; scripts/bench/README.md). V8 reads the flag each time it recomputes the limit,
 * so it takes effect when set at run time.
 *
 * A `--heap-growing-percent` given by the operator (command line or NODE_OPTIONS) wins.
 * Returns the percent in force, or null when it was the operator's.
 */
export function tuneServerHeap(execArgv: readonly string[] = process.execArgv, nodeOptions: string | undefined = process.env.NODE_OPTIONS): number | null {
  const given = [...execArgv, ...(nodeOptions ?? '').split(/\s+/)].some((a) => /^--heap[-_]growing[-_]percent(=|$)/.test(a));
  if (given) return null;
  setFlagsFromString(`--heap-growing-percent=${SERVER_HEAP_GROWING_PERCENT}`);
  return SERVER_HEAP_GROWING_PERCENT;
}
