import type { Client } from 'aedes';
import type { LevelPersistence } from 'aedes-persistence-level';
import type { Level } from 'level';

/** aedes-persistence-level's index of delivered, unacknowledged packets: `outgoing-id:{client}:{id}` */
const ID_PREFIX = 'outgoing-id:';

/**
 * Packet ids a durable client's queue still holds, so that a new delivery never takes one.
 *
 * aedes gives a new QoS 1 delivery the connection's next packet id (QoSPacket: client._nextId,
 * counting from a random start) without asking whether a delivery of the replayed queue still
 * uses it: those keep the ids they were first sent with, as MQTT requires [MQTT-4.4.0-1]. Two
 * unacknowledged publishes with one id on one connection break the rule that a new packet
 * takes an unused id [MQTT-2.3.1-2], and the store's index by id (one slot per id) then lets
 * the first PUBACK clear the other message: the one it acknowledged stays queued and comes
 * again at the next connect. A test consumer leaving and coming back during a flood met it
 * (21 of 3,000 messages, once in a CI run).
 *
 * The ids in use are tracked per client id from the store's own index (read once at start) and
 * its writes (outgoingUpdate: an id now in use; outgoingClearMessageId: free again), and a
 * durable client's `_nextId` skips them. Memory: one number per delivered, unacknowledged
 * message of a durable client. Not followed: an id the store drops when it renumbers a queued
 * packet (aedes-persistence-level #updateWithBrokerData); it stays skipped until the hub
 * restarts, which costs nothing but that id.
 */
export class OutgoingIds {
  private readonly byClient = new Map<string, Set<number>>();

  /** Read the ids already in use from the store (at start, before any client connects). */
  async load(db: Level<string, Buffer>): Promise<void> {
    for await (const key of db.keys({ gt: ID_PREFIX, lt: `${ID_PREFIX}\uffff` })) {
      const sep = key.lastIndexOf(':');
      const id = Number(key.slice(sep + 1));
      if (sep <= ID_PREFIX.length || !Number.isInteger(id) || id < 1 || id > 65535) continue;
      this.add(decodeURIComponent(key.slice(ID_PREFIX.length, sep)), id);
    }
  }

  /** Follow the store's writes of the id index. */
  track<P extends LevelPersistence>(p: P): P {
    const update = p.outgoingUpdate.bind(p);
    p.outgoingUpdate = async (client, packet) => {
      const r = await update(client, packet);
      const id = (packet as { messageId?: number }).messageId;
      if (client.id !== null && typeof id === 'number') this.add(client.id, id);
      return r;
    };
    const clear = p.outgoingClearMessageId.bind(p);
    p.outgoingClearMessageId = async (client, packet) => {
      const r = await clear(client, packet);
      if (client.id !== null && typeof packet.messageId === 'number') this.delete(client.id, packet.messageId);
      return r;
    };
    return p;
  }

  /** Make a durable client's next packet id skip the ids its queue holds. */
  guard(client: Client): void {
    const ids = this.byClient;
    const clientId = client.id;
    let next = Number(Reflect.get(client, '_nextId')) || 1;
    Object.defineProperty(client, '_nextId', {
      configurable: true,
      enumerable: true,
      get(): number {
        const used = clientId === null ? undefined : ids.get(clientId);
        // every id in use (a queue of 65,535 unacknowledged deliveries): none is left to give,
        // and aedes repeats one, as it did before
        if (used !== undefined && used.size < 65535) {
          while (used.has(next)) next = next >= 65535 ? 1 : next + 1;
        }
        return next;
      },
      set(v: number) {
        next = v;
      },
    });
  }

  /** ids in use for `clientId` (tests, diagnostics) */
  inUse(clientId: string): number {
    return this.byClient.get(clientId)?.size ?? 0;
  }

  private add(clientId: string, id: number): void {
    let set = this.byClient.get(clientId);
    if (set === undefined) this.byClient.set(clientId, (set = new Set()));
    set.add(id);
  }

  private delete(clientId: string, id: number): void {
    const set = this.byClient.get(clientId);
    if (set === undefined) return;
    set.delete(id);
    if (set.size === 0) this.byClient.delete(clientId);
  }
}
