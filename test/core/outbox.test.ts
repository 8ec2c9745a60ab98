import { MemoryOutbox } from '../../core/outbox.ts';
import { outboxContract } from './outbox-contract.ts';

outboxContract('MemoryOutbox', async (maxBytes) => {
  const outbox = new MemoryOutbox({ maxBytes });
  return { outbox, cleanup: () => outbox.close() };
});
