// aedes-persistence-level ships no types; these are the parts the hub touches
// (the AsyncPersistence interface of aedes-persistence 10).
declare module 'aedes-persistence-level' {
  import type { Readable } from 'node:stream';
  import type { Level } from 'level';
  export interface LevelPersistence {
    /** queue `packet` for every durable subscription in `subs` */
    outgoingEnqueueCombi(subs: ReadonlyArray<{ clientId: string }>, packet: { topic: string }): Promise<unknown>;
    /** record the messageId a queued packet is being delivered under */
    outgoingUpdate(client: { id: string | null }, packet: object): Promise<unknown>;
    /** store (or, with an empty payload, delete) the retained message of `packet.topic` */
    storeRetained(packet: { topic: string; payload: Buffer }): Promise<void>;
    createRetainedStreamCombi(patterns: string[]): AsyncIterable<{ topic: string; payload: Buffer }>;
    /** forget the queued packet a PUBACK acknowledged; resolves with it, or undefined */
    outgoingClearMessageId(client: { id: string | null; clean?: boolean }, packet: { messageId?: number }): Promise<unknown>;
    /** a durable client's queue: packets not delivered yet, and delivered but not acknowledged */
    outgoingStream(client: { id: string | null }): Readable;
  }
  export default function aedesPersistenceLevel(db: Level<string, Buffer>): LevelPersistence;
}
