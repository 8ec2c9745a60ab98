import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createSocket } from 'node:dgram';
import { COAP_PATH_ROOT, COAP_QUERY_COUNTER, COAP_QUERY_MAC, SENML_JSON_FORMAT } from '../../firmware-bridge/coap.ts';
import { mcuKey, signMcuMessage } from '../../firmware-bridge/auth.ts';
import { COAP_METHOD, decodeMessage, encodeRequest } from '../../esp32-sim/coap-lite.ts';
import { waitFor } from '../helpers.ts';
import { nextCounter, of, withEnv } from './env.ts';

const timers = () => process.getActiveResourcesInfo().filter((r) => r === 'Timeout').length;

/**
 * Answered CoAP exchanges at the gateway: a raw UDP client (the simulator's wire encoder,
 * no client library, so no timers of its own in this process) sends confirmable telemetry.
 */
test('gateway CoAP: a retransmitted request gets the same piggybacked 2.04 from the cache, stored once; answered exchanges keep no timers', async () => {
  await withEnv(async ({ gw, site, seen }) => {
    const sock = createSocket('udp4');
    await new Promise<void>((r) => sock.bind(0, '127.0.0.1', () => r()));
    const replies = new Map<number, Buffer[]>();
    sock.on('message', (msg) => {
      const d = decodeMessage(msg);
      if (d) replies.set(d.mid, [...(replies.get(d.mid) ?? []), msg]);
    });
    const send = (buf: Buffer) => new Promise<void>((r, j) => sock.send(buf, gw.coapPort, '127.0.0.1', (err) => (err ? j(err) : r())));
    const request = (id: string, mid: number, value: number): Buffer => {
      const payload = Buffer.from(JSON.stringify([{ n: 'temp', v: value }]));
      const c = nextCounter();
      const mac = signMcuMessage(mcuKey(site, id), id, 't', c, payload);
      return encodeRequest({ method: COAP_METHOD.POST, path: [...COAP_PATH_ROOT, id, 't'], query: [`${COAP_QUERY_COUNTER}=${c}`, `${COAP_QUERY_MAC}=${mac}`], contentFormat: SENML_JSON_FORMAT, payload }, 0, mid, 0x1000 + mid);
    };
    try {
      // warm up (first MCU registration, outbox open) so the timer count below is steady
      await send(request('esp-x0', 1, 1));
      await waitFor(() => replies.has(1), 'the first answer');
      const before = timers();
      const n = 60;
      for (let i = 0; i < n; i++) await send(request(`esp-x${(i % 6) + 1}`, 100 + i, i));
      await waitFor(() => replies.size === n + 1, `answers to ${n} requests`);
      for (let i = 0; i < n; i++) {
        const d = decodeMessage(replies.get(100 + i)![0]!)!;
        assert.equal(d.type, 2, 'piggybacked on the ACK');
        assert.equal(d.code, '2.04');
      }
      // The package used to keep one ~5 minute timer per answered exchange (its RetrySend
      // MAX_RTT timeout), holding request and response alive: 60 more timers here.
      const after = timers();
      assert.ok(after - before < 10, `timers before ${before}, after ${after}`);

      // a retransmission (same message id and token, e.g. the ACK was lost): the same
      // answer again, from the cache, not a replay refusal; and the reading is stored once
      const again = request('esp-x9', 500, 42);
      await send(again);
      await waitFor(() => replies.get(500)?.length === 1, 'the answer');
      await send(again);
      await waitFor(() => replies.get(500)?.length === 2, 'the answer to the retransmission');
      assert.deepEqual(replies.get(500)![1], replies.get(500)![0], 'byte for byte the same 2.04');
      await waitFor(() => of(seen, 'esp-x9', 'telemetry').length >= 1, 'the reading at the hub');
      await new Promise((r) => setTimeout(r, 300));
      assert.equal(of(seen, 'esp-x9', 'telemetry').length, 1, 'stored once');
    } finally {
      sock.close();
    }
  });
});
