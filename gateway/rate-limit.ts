/**
 * Per-MCU message rate limit (`mcu.msgRate`, `mcu.msgBurst`): a token bucket per MCU,
 * `rate` messages a second on average and bursts of up to `burst` (an MCU that wakes from
 * deep sleep and sends what it kept). It protects what every MCU of the site shares (the
 * outbox's byte budget, the uplink to the hub, the gateway's CPU) from one MCU whose
 * firmware publishes in a loop. It loses nothing (docs/mcu-protocol.md "Rate limit"):
 * over MQTT the gateway reads that MCU's connection more slowly (the PUBACK comes when a
 * token is free, and TCP's flow control holds the MCU back); over CoAP it answers 5.03 with
 * Max-Age, and the MCU keeps the message and sends it again after that time.
 *
 * Counts only messages that become records for the hub (telemetry, hello, ack, log), not
 * firmware chunk requests or mailbox reads.
 */
/** a bucket untouched this long is forgotten at the next sweep (if it is full again) */
const IDLE_MS = 10 * 60_000;
/** sweeps closer together than this do nothing (each visits every bucket) */
const SWEEP_EVERY_MS = 60_000;

export class McuRateLimit {
  private readonly buckets = new Map<string, { tokens: number; at: number }>();
  private sweptAt = -Infinity;

  constructor(
    /** messages a second per MCU; 0 = no limit */
    private readonly rate: number,
    private readonly burst: number,
    /** a monotonic clock, ms (a wall clock stepped back would stall every MCU for as long) */
    private readonly now: () => number = () => performance.now(),
  ) {}

  /** 0: go ahead (one token taken); otherwise the ms until a token is free (none taken). */
  take(mcuId: string): number {
    if (this.rate <= 0) return 0;
    const b = this.bucket(mcuId);
    if (b.tokens >= 1) {
      b.tokens -= 1;
      return 0;
    }
    return Math.max(1, Math.ceil(((1 - b.tokens) * 1000) / this.rate));
  }

  /**
   * Take `n` more tokens from the MCU's bucket, into debt if need be: a message that costs
   * more than one (a log upload, by its size) slows the MCU's next ones in proportion.
   */
  charge(mcuId: string, n: number): void {
    if (this.rate <= 0 || n <= 0) return;
    this.bucket(mcuId).tokens -= n;
  }

  /** The MCU's bucket, refilled to now (a new one is full). */
  private bucket(mcuId: string): { tokens: number; at: number } {
    const now = this.now();
    let b = this.buckets.get(mcuId);
    if (b === undefined) {
      b = { tokens: this.burst, at: now };
      this.buckets.set(mcuId, b);
      return b;
    }
    b.tokens = Math.min(this.burst, b.tokens + (Math.max(0, now - b.at) * this.rate) / 1000);
    b.at = now;
    return b;
  }

  /**
   * Forget the buckets of MCUs silent for IDLE_MS (full again by then: such an MCU is treated
   * as new, which is the same). Not every full bucket: an MCU sending once a second is full
   * again within 50 ms, and dropping its bucket each sweep only to make it anew at its next
   * message churned 10,000 objects a minute into the old generation at 10,000 MCUs.
   * Called often (the gateway's 1 s timer); does its work at most once a minute.
   */
  sweep(): void {
    const now = this.now();
    if (now - this.sweptAt < SWEEP_EVERY_MS) return;
    this.sweptAt = now;
    for (const [id, b] of this.buckets) if (now - b.at >= IDLE_MS && b.tokens + ((now - b.at) * this.rate) / 1000 >= this.burst) this.buckets.delete(id);
  }

  /** buckets held now */
  get size(): number {
    return this.buckets.size;
  }
}
