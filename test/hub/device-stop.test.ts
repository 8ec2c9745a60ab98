import { test } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { deriveToken } from '../../core/credentials.ts';
import { decodeMessage, type StateMessage } from '../../core/messages.ts';
import { connectFleetClient, disconnectFleetClient } from '../../core/mqtt.ts';
import { deviceTopic } from '../../core/topics.ts';
import { waitFor } from '../helpers.ts';
import { connect, withHub, type HubCtx } from './harness.ts';

/** The retained state of `id` as a new operator subscriber gets it. */
async function retainedState(ctx: HubCtx, id: string): Promise<StateMessage> {
  const op = await connect(ctx.url, `op-${id}`, 'operator', ctx.operator);
  try {
    const got = new Promise<StateMessage>((resolve) => op.once('message', (_t, payload) => resolve(decodeMessage('state', payload))));
    await op.subscribeAsync(deviceTopic(id, 'state'), { qos: 1 });
    return await got;
  } finally {
    await op.endAsync(true);
  }
}

test('a device that stops (disconnectFleetClient) stays "stopped" at the hub: its DISCONNECT drops the last will; one that dies is "connection lost"', async () => {
  await withHub(async (hub, ctx) => {
    const start = async (id: string) => {
      const client = connectFleetClient({ url: ctx.url, deviceId: id, token: deriveToken(ctx.secret, 'device', id), kind: 'gateway', version: '1.0.0', keepalive: 5, reconnectMs: 0 });
      await new Promise<void>((resolve, reject) => client.once('connect', () => resolve()).once('error', reject));
      await waitFor(() => hub.registry.get(id)?.online === true, `${id} online`);
      return client;
    };
    const stopped = await start('gw-stop');
    await disconnectFleetClient(stopped, 'gw-stop', 'gateway', '1.0.0');
    await waitFor(() => hub.registry.get('gw-stop')?.online === false, 'gw-stop offline');
    await sleep(300); // a will, had it been sent, is published when the broker sees the connection end
    assert.equal(hub.registry.get('gw-stop')?.reason, 'stopped');
    assert.equal((await retainedState(ctx, 'gw-stop')).reason, 'stopped');

    const died = await start('gw-dead');
    died.stream.destroy(); // no DISCONNECT: a crash, a cut cable
    await waitFor(() => hub.registry.get('gw-dead')?.online === false, 'gw-dead offline');
    assert.equal(hub.registry.get('gw-dead')?.reason, 'connection lost');
    assert.equal((await retainedState(ctx, 'gw-dead')).reason, 'connection lost');
    await died.endAsync(true);
  });
});
