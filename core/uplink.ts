import { EventEmitter } from 'node:events';
import type { MqttClient } from 'mqtt';
import type { Logger } from './log.ts';
import type { Outbox } from './outbox.ts';

export interface UplinkOptions {
  client: MqttClient;
  outbox: Outbox;
  log: Logger;
  /** most QoS 1 publishes awaiting PUBACK at once */
  window?: number;
}

/**
 * Sends the outbox to the hub: QoS 1, a bounded in-flight window, and a record leaves
 * the outbox only after its PUBACK (at-least-once; the hub drops duplicates by mid).
 * Only pumps while connected, so nothing piles up in the MQTT client's memory.
 */
export class Uplink extends EventEmitter {
  private readonly inflight = new Set<string>();
  private readonly window: number;
  private pumping = false;
  /** a kick arrived while pumping: the pump's last peek may predate a new record */
  private again = false;
  private stopped = false;
  sent = 0;

  constructor(private readonly opts: UplinkOptions) {
    super();
    this.window = opts.window ?? 32;
    opts.client.on('connect', this.kick);
    opts.outbox.on('appended', this.kick);
  }

  get connected(): boolean {
    return this.opts.client.connected;
  }

  get inFlight(): number {
    return this.inflight.size;
  }

  private kick = (): void => {
    void this.pump();
  };

  private async pump(): Promise<void> {
    if (this.stopped) return;
    if (this.pumping) {
      this.again = true;
      return;
    }
    this.pumping = true;
    try {
      this.again = false;
      while (!this.stopped && this.opts.client.connected && this.inflight.size < this.window) {
        const batch = await this.opts.outbox.peek(this.window - this.inflight.size, this.inflight);
        if (batch.length === 0) {
          // an append (or ack) during that peek may not be in its result: look once more
          if (!this.again) break;
          this.again = false;
          continue;
        }
        for (const rec of batch) {
          this.inflight.add(rec.id);
          this.opts.client.publish(rec.topic, rec.payload, { qos: 1 }, (err) => {
            if (err) {
              this.inflight.delete(rec.id);
              return; // stays in the outbox; sent again after reconnect
            }
            this.opts.outbox.ack([rec.id]).then(
              () => {
                this.inflight.delete(rec.id);
                this.sent++;
                this.kick();
              },
              (e: unknown) => this.opts.log.error('outbox ack failed', { err: e }),
            );
          });
        }
      }
    } catch (err) {
      this.opts.log.error('uplink pump failed', { err });
    } finally {
      this.pumping = false;
    }
  }

  stop(): void {
    this.stopped = true;
    this.opts.client.off('connect', this.kick);
    this.opts.outbox.off('appended', this.kick);
  }
}
