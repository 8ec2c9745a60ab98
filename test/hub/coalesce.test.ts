import { test } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { createServer, connect, type Socket } from 'node:net';
import { coalesceWrites } from '../../hub/broker.ts';

/** A loopback TCP pair: the hub's side (coalesced, as hub/index.ts does) and the peer's. */
async function pair(): Promise<{ hubSide: Socket; peer: Socket; close: () => void }> {
  const server = createServer();
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const accepted = once(server, 'connection');
  const peer = connect((server.address() as { port: number }).port, '127.0.0.1');
  const [hubSide] = (await accepted) as [Socket];
  coalesceWrites(hubSide);
  return {
    hubSide,
    peer,
    close: () => {
      hubSide.destroy();
      peer.destroy();
      server.close();
    },
  };
}

test('coalesceWrites: deliveries written from immediates leave together, and before the next poll phase (by the timers of the next iteration), in order', async () => {
  const { hubSide, peer, close } = await pair();
  try {
    const got: Buffer[] = [];
    peer.on('data', (d: Buffer) => got.push(d));
    let flushes = 0;
    const writev = Reflect.get(hubSide, '_writev') as (...a: unknown[]) => void;
    const write1 = Reflect.get(hubSide, '_write') as (...a: unknown[]) => void;
    Reflect.set(hubSide, '_writev', function (this: unknown, ...a: unknown[]) {
      flushes++;
      return Reflect.apply(writev, this, a);
    });
    Reflect.set(hubSide, '_write', function (this: unknown, ...a: unknown[]) {
      flushes++;
      return Reflect.apply(write1, this, a);
    });
    // as aedes delivers: one immediate per delivery, each writing (here 200 of them, queued
    // from a microtask as aedes queues them after its persistence lookup)
    const atTimers = await new Promise<{ corked: number; buffered: number; flushes: number }>((resolve) => {
      queueMicrotask(() => {
        for (let i = 0; i < 200; i++) {
          setImmediate(() => {
            hubSide.write(Buffer.from(`d${i};`));
            // the last delivery asks what the next iteration's timers phase sees: it runs
            // before that iteration polls for I/O (the next batch to route, in the hub)
            if (i === 199) {
              setTimeout(() => resolve({ corked: hubSide.writableCorked, buffered: hubSide.writableLength, flushes }), 0);
              // a check phase as long as the hub's under load (delivering hundreds of readings):
              // the 0 ms timers are due when the next iteration starts
              const until = performance.now() + 3;
              while (performance.now() < until);
            }
          });
        }
      });
    });
    assert.equal(atTimers.corked, 0, 'released before the next poll phase');
    assert.equal(atTimers.buffered, 0, 'nothing left in the stream buffer');
    assert.equal(atTimers.flushes, 1, '200 writes left in one flush');
    const want = Array.from({ length: 200 }, (_, i) => `d${i};`).join('');
    const deadline = Date.now() + 5000;
    while (Buffer.concat(got).toString() !== want && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    assert.equal(Buffer.concat(got).toString(), want);
  } finally {
    close();
  }
});
