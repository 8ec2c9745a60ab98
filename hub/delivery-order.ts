import { Readable } from 'node:stream';
import type { AedesPublishPacket, Client } from 'aedes';
import type { LevelPersistence } from 'aedes-persistence-level';

/**
 * Loss and reordering of QoS 1 deliveries in aedes 1.2, and what the hub does about them
 * (docs/topics.md#de-duplication; measured in test/hub/delivery.test.ts).
 *
 * A publish takes its `brokerCounter` when it starts (aedes.js publish → new Packet), then
 * runs storeRetained → enqueueOffline → emitPacket. Subscribers get the packet at
 * emitPacket, when the persistence steps before it have finished: a retained message waits
 * for its LevelDB put, and every publish that matches a durable (clean=false) subscription
 * waits for its queue write (outgoingEnqueueCombi). Those writes finish in any order, so
 * packets reach subscribers out of counter order.
 *
 * Each client keeps only the highest counter it was sent per broker id (`dedupe` in
 * aedes/lib/client.js) and silently drops any packet with a lower one. So a packet
 * overtaken on the way is lost at every subscriber the overtaking packet reached first:
 * with one durable subscriber connected, 5,000 concurrent publishes lost 199–318 at a clean
 * subscriber here, a single device publishing directly lost messages too, and every
 * retained message interleaved with other traffic was lost (upstream: moscajs/aedes#994,
 * #955). The QoS 1 PUBACK had long gone to the publisher, so nobody resends them.
 *
 * With a single broker that check does one useful thing: it drops the extra copies of one
 * packet for a client whose subscriptions overlap ([MQTT-3.3.5-1] allows a copy per
 * matching subscription; aedes sends one). The hub therefore
 *  1. makes the counter check always pass for its own broker id (disableCounterDedupe),
 *  2. drops exactly those copies instead (CopyFilter: the copies of one packet are handed to
 *     a client one after another, synchronously, inside a single mqemitter emit), and
 *  3. completes queue writes in call order (orderPersistence), so that non-retained
 *     publishes reach subscribers in the order they started, and per durable client the
 *     writes to its socket follow that order too; retained publishes on one topic are
 *     stored one after another, so they reach subscribers, and stay retained, in the order
 *     they were sent. This keeps a sender's order on a topic
 *     [MQTT-4.6.0-6] and lets batch items be published concurrently yet arrive in order.
 *
 * A fourth problem shows at a durable client's reconnect (ReplayGate): see there.
 */

/**
 * Make aedes' per-client counter check pass for packets of `brokerId`. Returns false when
 * the aedes internals it relies on are not there (an aedes upgrade): then nothing changed.
 */
export function disableCounterDedupe(client: Client, brokerId: string): boolean {
  const seen: unknown = Reflect.get(client, 'duplicates');
  if (typeof seen !== 'object' || seen === null) return false;
  // dedupe() reads `duplicates[brokerId] || 0` and stores the counter after a delivery:
  // always 0 on read, and the store is ignored
  Object.defineProperty(seen, brokerId, { get: () => 0, set: () => undefined, configurable: true, enumerable: false });
  return true;
}

/** Recognises the extra copies of one packet for a client with overlapping subscriptions. */
export class CopyFilter {
  private readonly last = new WeakMap<Client, number>();

  constructor(private readonly brokerId: string) {}

  /** true when `packet` is the packet just handed to `client` (an extra copy). */
  isCopy(client: Client, packet: AedesPublishPacket): boolean {
    // retained messages sent on SUBSCRIBE carry no brokerId and are never copies
    if (packet.brokerId !== this.brokerId) return false;
    if (this.last.get(client) === packet.brokerCounter) return true;
    this.last.set(client, packet.brokerCounter);
    return false;
  }
}

/**
 * Let the persistence's queue writes complete in the order they were called: the writes
 * still run concurrently, only their completions are handed back in order. Queue writes
 * (outgoingEnqueueCombi) are ordered across the broker, since emitPacket follows them;
 * updates before a write to a durable client's socket (outgoingUpdate) per client.
 */
export function orderPersistence<P extends LevelPersistence>(
  p: P,
  neverQueue: (topic: string) => boolean = () => false,
  watch: { issued(packet: object): void; settled(packet: object): void } = { issued: noop, settled: noop },
): P {
  const enqueue = p.outgoingEnqueueCombi.bind(p);
  let tail: Promise<unknown> = Promise.resolve();
  /** queue writes issued and not yet settled */
  let pending = 0;
  p.outgoingEnqueueCombi = (subs, packet) => {
    // a topic nobody may receive (the hub's sinks) is not written to any queue: it would sit
    // in a durable '#' subscriber's queue until its next reconnect
    if (neverQueue(packet.topic)) return Promise.resolve();
    // No durable subscriber to write for, and no earlier write still under way: nothing to
    // order against (every earlier publish's continuation is queued already, and this one's
    // comes after it), so skip the chain. This is every routed reading when no consumer
    // holds a durable session: a per-reading cost of the relay path otherwise.
    if ((!subs || subs.length === 0) && pending === 0) return Promise.resolve();
    watch.issued(packet);
    pending++;
    const own = enqueue(subs, packet);
    // its failure is reported through `ordered`, later: mark it handled now, or Node would
    // take it for an unhandled rejection and end the process
    own.catch(noop);
    const ordered = tail.then(() => own);
    // Registered before aedes gets `ordered`, so it runs before aedes' own continuation
    // (emitPacket). A failed write must not hold back or fail the ones after it.
    const settled = () => {
      pending--;
      watch.settled(packet);
    };
    tail = ordered.then(settled, settled);
    return ordered;
  };

  // Retained publishes on one topic are stored one after another, in call order: each waits
  // for its LevelDB put before it goes on, and puts run on several threads, so two on one
  // topic (an MCU's online state and, right after, the one its hello completes) could be
  // delivered in the other order, and the older one could even be what stays retained.
  const storeRetained = p.storeRetained.bind(p);
  const retainTails = new Map<string, Promise<unknown>>();
  p.storeRetained = (packet) => {
    const prev = retainTails.get(packet.topic);
    const own = prev ? prev.then(() => storeRetained(packet)) : storeRetained(packet);
    // a failure reaches aedes through `own` and does not stop the next one (settled either way)
    const settled = own.then(noop, noop);
    retainTails.set(packet.topic, settled);
    void settled.then(() => {
      if (retainTails.get(packet.topic) === settled) retainTails.delete(packet.topic);
    });
    return own;
  };

  const update = p.outgoingUpdate.bind(p);
  const tails = new Map<string | null, Promise<unknown>>();
  p.outgoingUpdate = (client, packet) => {
    const own = update(client, packet);
    own.catch(noop); // as above
    const prev = tails.get(client.id);
    const ordered = prev ? prev.then(() => own) : own;
    const settled = ordered.then(noop, noop);
    tails.set(client.id, settled);
    void settled.then(() => {
      if (tails.get(client.id) === settled) tails.delete(client.id);
    });
    return ordered;
  };
  return p;
}

/**
 * When a durable (clean=false) client connects, aedes restores its subscriptions first
 * (live delivery starts) and reads its queue afterwards (emptyQueue, over a LevelDB
 * snapshot). A message queued and emitted in between is sent twice, live and from the
 * queue: a duplicate at the consumer (measured: a few per hub restart under load). The two
 * copies also race on the queue's bookkeeping; the loser fails with "no such packet", aedes
 * drops the connection, and what was unacknowledged on it is sent yet again.
 *
 * The gate numbers queue writes as they are issued and follows their completion (in call
 * order, see orderPersistence). When aedes opens a reconnecting client's queue the gate
 * takes the snapshot at once and notes both positions. Then, for a live delivery:
 *  - before the snapshot: refused; it was queued (emitPacket follows the queue write), so
 *    the snapshot will have it and the replay sends it;
 *  - its write completed before the snapshot: refused, the replay sends it;
 *  - its write was issued after the snapshot: sent live, the replay cannot have it;
 *  - its write was under way at the snapshot (LevelDB does not wait for it): may or may not
 *    be in the snapshot. Held until the replay has been read, then sent only if the replay
 *    did not have it. These are the few writes in flight at one instant.
 * A refused live copy leaves its queue entry alone (aedes clears by messageId, which a live
 * packet does not have yet), so the replay's PUBACK clears it. Replay copies are told apart
 * by their messageId: emptyQueue gives each one (QoSPacket), live packets have none yet.
 *
 * The snapshot also waits for the client's previous connection to finish clearing what it
 * acknowledged. aedes handles a PUBACK by a LevelDB get and then a delete
 * (outgoingClearMessageId) and waits for neither before it closes the connection on the
 * DISCONNECT that follows, nor before it opens the queue of the next connection with the
 * same client id. A snapshot taken while those deletes are under way has the acknowledged
 * messages in it, and they are sent again. A replayed entry whose delete lands while aedes
 * re-numbers it (outgoingUpdate) fails with "no such packet", and aedes drops the new
 * connection. With the store's deletes slowed to 150 ms (test/hub/delivery.test.ts) a
 * consumer that came straight back got nothing more after its first reconnect.
 */
export class ReplayGate {
  private issuedSeq = 0;
  private settledSeq = 0;
  /** `brokerId:brokerCounter` → issue number, for recent queue writes only */
  private readonly index = new Map<string, number>();
  private readonly clients = new WeakMap<Client, GateState>();
  /** client id → its queue clears (PUBACKs) under way, settled together */
  private readonly clears = new Map<string, Promise<void>>();

  /** A queue write was issued. */
  issued(packet: object): void {
    this.index.set(keyOf(packet), ++this.issuedSeq);
    // a live copy follows its write within a few turns of the loop: keep only recent ones
    if (this.index.size > INDEX_KEEP) for (const k of this.index.keys()) {
      this.index.delete(k);
      break;
    }
  }

  /** A queue write completed or failed (reported in issue order). */
  settled(packet: object): void {
    this.settledSeq = Math.max(this.settledSeq, this.index.get(keyOf(packet)) ?? 0);
  }

  /** A durable client authenticated: its queue will be replayed. */
  begin(client: Client): void {
    this.clients.set(client, { done: 0, issued: Infinity, reading: true, held: new Map(), replayed: new Set() });
  }

  /** For authorizeForward: false when this delivery must not be sent (now). */
  mayForward(client: Client, packet: AedesPublishPacket): boolean {
    const st = this.clients.get(client);
    // QoS 0 is never queued; retained messages sent on SUBSCRIBE have no brokerId
    if (!st || packet.qos === 0 || !packet.brokerId || packet.messageId !== undefined) return true;
    const k = keyOf(packet);
    const n = this.index.get(k);
    if (n === undefined) return true;
    if (st.issued === Infinity || n <= st.done) return false;
    if (n > st.issued) return true;
    if (st.reading) {
      st.held.set(k, packet);
      return false;
    }
    return !st.replayed.has(k);
  }

  /**
   * Wrap persistence.outgoingStream: snapshot as soon as the client's earlier clears are done,
   * and watch what the replay reads. Wrap outgoingClearMessageId to know those clears.
   */
  wrap<P extends LevelPersistence>(p: P): P {
    const clear = p.outgoingClearMessageId.bind(p);
    p.outgoingClearMessageId = (client, packet) => {
      const own = clear(client, packet);
      // a refused live copy has no messageId yet (see above): its lookup finds nothing
      if (client.id !== null && packet.messageId !== undefined) this.clearing(client.id, own);
      return own;
    };
    const stream = this.snapshot(p.outgoingStream.bind(p));
    p.outgoingStream = (client) => {
      const earlier = client.id === null ? undefined : this.clears.get(client.id);
      if (earlier === undefined) return stream(client);
      return Readable.from(
        (async function* () {
          await earlier;
          yield* stream(client);
        })(),
      );
    };
    return p;
  }

  /** Follow a clear of `clientId`'s queue entry until it settles. */
  private clearing(clientId: string, own: Promise<unknown>): void {
    const prev = this.clears.get(clientId);
    const settled = own.then(noop, noop);
    const all = prev === undefined ? settled : Promise.all([prev, settled]).then(noop);
    this.clears.set(clientId, all);
    void all.then(() => {
      if (this.clears.get(clientId) === all) this.clears.delete(clientId);
    });
  }

  /** outgoingStream that takes its snapshot at once and watches what the replay reads. */
  private snapshot(stream: LevelPersistence['outgoingStream']): LevelPersistence['outgoingStream'] {
    return (client) => {
      const st = isClient(client) ? this.clients.get(client) : undefined;
      if (!isClient(client) || !st || st.issued !== Infinity) return stream(client);
      const c = client;
      const inner = stream(c);
      // The LevelDB iterator, and with it the snapshot, is created synchronously on the
      // first read (classic-level: "snapshot guarantees"): the positions noted next are
      // exactly those of the snapshot.
      inner.read(0);
      st.done = this.settledSeq;
      st.issued = this.issuedSeq;
      const index = this.index;
      const release = () => this.release(c, st);
      return Readable.from(
        (async function* () {
          try {
            for await (const packet of inner) {
              const k = keyOf(packet);
              const n = index.get(k);
              if (n !== undefined && n > st.done && n <= st.issued) st.replayed.add(k);
              yield packet;
            }
          } finally {
            release();
          }
        })(),
      );
    };
  }

  private release(client: Client, st: GateState): void {
    if (!st.reading) return;
    st.reading = false;
    const held = [...st.held].filter(([k]) => !st.replayed.has(k)).map(([, p]) => p);
    st.held.clear();
    setTimeout(() => this.clients.delete(client), STATE_KEEP_MS).unref();
    const deliver: unknown = Reflect.get(client, 'deliverQoS');
    if (client.closed || typeof deliver !== 'function') return; // still queued: sent at the next connect
    for (const packet of held) deliver.call(client, packet, noop);
  }
}

interface GateState {
  /** issue number of the last queue write settled when the snapshot was taken */
  done: number;
  /** issue number of the last queue write issued by then (Infinity: no snapshot yet) */
  issued: number;
  /** the replay is still being read */
  reading: boolean;
  /** live deliveries of writes under way at the snapshot, until the replay is read */
  held: Map<string, AedesPublishPacket>;
  /** of those writes, the ones the replay had */
  replayed: Set<string>;
}

/** queue writes the gate remembers */
const INDEX_KEEP = 100_000;
/** how long after its replay was read a client's live deliveries are still checked */
const STATE_KEEP_MS = 10_000;

function keyOf(packet: unknown): string {
  if (typeof packet !== 'object' || packet === null) return '';
  return `${String(Reflect.get(packet, 'brokerId'))}:${String(Reflect.get(packet, 'brokerCounter'))}`;
}

function isClient(c: { id: string | null }): c is Client & { id: string | null } {
  return typeof Reflect.get(c, 'deliverQoS') === 'function';
}

function noop(): void {}
