import { MemoryOutbox } from '../../core/outbox.ts';
import { LevelOutbox } from '../../core/outbox-level.ts';
import { tempDir } from '../helpers.ts';
import { outboxContract } from './outbox-contract.ts';

outboxContract('MemoryOutbox', async (maxBytes) => {
  const outbox = new MemoryOutbox({ maxBytes });
  return { outbox, cleanup: () => outbox.close() };
});

outboxContract('LevelOutbox', async (maxBytes) => {
  const tmp = tempDir('fleetlet-outbox-');
  const outbox = await LevelOutbox.open(tmp.dir, { maxBytes, minFreeBytes: 0 });
  return {
    outbox,
    cleanup: async () => {
      await outbox.close();
      tmp.cleanup();
    },
  };
});
