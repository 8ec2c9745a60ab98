// aedes-persistence-level ships no types; this is the one call we make.
declare module 'aedes-persistence-level' {
  import type { Level } from 'level';
  export default function aedesPersistenceLevel(db: Level<string, Buffer>): unknown;
}
