// Types for dist-lock.mjs, so strict TypeScript tests can import it.
export const GUARD_STALE_MS: number;
export function acquireLock(lock: string, opts?: { timeoutMs?: number; pollMs?: number }): Promise<void>;
