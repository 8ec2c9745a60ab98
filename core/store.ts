import { mkdirSync } from 'node:fs';
import { Level } from 'level';
import { FleetError } from './errors.ts';

/** Open (creating) a LevelDB store at `dir`, with a clear error when it cannot be. */
export async function openStore<V = Buffer>(dir: string, valueEncoding: 'buffer' | 'json' | 'utf8' = 'buffer'): Promise<Level<string, V>> {
  try {
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    const db = new Level<string, V>(dir, { valueEncoding });
    await db.open();
    return db;
  } catch (err) {
    // LevelDB's lock: the usual cause is a second process started on the same state directory
    const locked = (err as { cause?: { code?: unknown } }).cause?.code === 'LEVEL_LOCKED';
    const why = locked ? 'another process holds its lock: is a fleetlet process already running on this state directory? Stop it, or give this one a state directory of its own' : (err as Error).message;
    throw new FleetError('FLEET_STORE', `cannot open store ${dir}: ${why}`, { cause: err });
  }
}
