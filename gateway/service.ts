import { EventEmitter } from 'node:events';
import { isFleetError } from '../core/errors.ts';
import type { Logger } from '../core/log.ts';
import { decodeMessage, encodeMessage, type CommandReply, type LogBatch, type TelemetrySamples } from '../core/messages.ts';
import { Priority } from '../core/outbox.ts';
import type { McuKeys } from '../firmware-bridge/auth.ts';
import { decodeTelemetryForRelay, type TelemetryFormat } from '../firmware-bridge/codecs.ts';
import { decodeMcuAck, decodeMcuHello, encodeMcuCommand } from '../firmware-bridge/frames.ts';
import type { FirmwareManager, ServedImage } from './firmware.ts';
import { toMcuCommand, type Mailbox, type MailboxEntry } from './mailbox.ts';
import type { McuRateLimit } from './rate-limit.ts';
import type { McuProtocol, Relay } from './relay.ts';

export type MailboxResult = 'queued' | 'delivered' | 'acked' | 'expired' | 'refused' | 'withdrawn';

export interface McuServiceOptions {
  relay: Relay;
  mailbox: Mailbox;
  firmware?: FirmwareManager | undefined;
  /** per-MCU keys (derived from the site secret) */
  keys: McuKeys;
  log: Logger;
  maxPayloadBytes: number;
  maxRecords: number;
  /** counted per mailbox outcome (metrics) */
  onMailbox?: (result: MailboxResult) => void;
  /** per-MCU message rate limit; none = unlimited */
  rate?: McuRateLimit | undefined;
  now?: () => number;
}

const MAX_LOG_LINE = 8192;
const BASE64_LINE = 6000;
/** an uploaded log's lines per record (the LogBatch schema's limit) */
const LOG_RECORD_LINES = 10_000;
/** and its encoded lines per record, bytes (below the hub's 1 MiB payload limit with room to spare) */
const LOG_RECORD_BYTES = 256 * 1024;
/** JSON around each line in a record ({"t":…,"app":"mcu","stream":"stderr","line":…}) */
const LOG_LINE_OVERHEAD = 60;
/** an upload takes one rate-limit token per this many bytes of records (the message's own token included) */
const LOG_TOKEN_BYTES = 16 * 1024;
/** at most this many tokens for one upload: its MCU's telemetry waits seconds for it, not hours */
const LOG_MAX_CHARGE = 256;

/**
 * What the gateway does with each MCU channel, independent of the transport: the MQTT
 * and CoAP ingresses authenticate and frame, then call in here. Every method resolves
 * once what the MCU sent is stored (outbox or mailbox), which is when the ingress
 * acknowledges it; decode errors are FLEET_MCU_DECODE.
 *
 * Emits 'head' (mcuId) when the next command for an MCU changed (new, acked, expired),
 * so an ingress can push it to an observing or subscribed MCU.
 */
export class McuService extends EventEmitter {
  private readonly now: () => number;
  private readonly sweepTimer: NodeJS.Timeout;
  private sweeping = false;

  constructor(private readonly opts: McuServiceOptions) {
    super();
    this.now = opts.now ?? Date.now;
    opts.mailbox.on('head', (mcuId: string) => this.emit('head', mcuId));
    this.sweepTimer = setInterval(() => void this.sweep(), 1000);
    this.sweepTimer.unref();
  }

  /**
   * Work the gateway still holds for an MCU: commands in its mailbox (each ends acked or
   * expired, with a reply to the hub) or a firmware update under way. Such an MCU is not
   * forgotten (Relay.forgetSilent): its replies and events need it registered.
   */
  hasPending(mcuId: string): boolean {
    if (this.opts.mailbox.entries(mcuId).length > 0) return true;
    const fw = this.opts.firmware?.state(mcuId)?.state;
    return fw !== undefined && fw !== 'succeeded' && fw !== 'failed';
  }

  /**
   * Before a message that becomes a record for the hub (telemetry, hello, ack, log): 0 to
   * go ahead, or the ms until this MCU may send the next one (gateway/rate-limit.ts).
   */
  admit(mcuId: string): number {
    return this.opts.rate?.take(mcuId) ?? 0;
  }

  /** Any authenticated contact (a mailbox GET, a firmware block): the MCU is awake. */
  touch(mcuId: string, protocol: McuProtocol): void {
    this.opts.relay.touch(mcuId, protocol);
  }

  /** Not async: one promise per message fewer (the relay's, shared by its group, is returned); a decode error rejects. */
  telemetry(mcuId: string, protocol: McuProtocol, payload: Buffer, format: TelemetryFormat | 'sniff'): Promise<void> {
    let samples: TelemetrySamples;
    try {
      samples = decodeTelemetryForRelay(payload, format, { maxBytes: this.opts.maxPayloadBytes, maxRecords: this.opts.maxRecords, sensors: this.opts.relay.meta(mcuId)?.sensors, now: this.now() });
    } catch (err) {
      return Promise.reject(err);
    }
    // returned, not awaited: no suspended frame (holding the samples) per message until stored
    return this.opts.relay.accept(mcuId, protocol, samples);
  }

  async hello(mcuId: string, protocol: McuProtocol, payload: Buffer): Promise<void> {
    const hello = decodeMcuHello(payload);
    await this.opts.relay.hello(mcuId, protocol, hello);
    await this.opts.firmware?.onHello(mcuId, hello);
  }

  async ack(mcuId: string, protocol: McuProtocol, payload: Buffer): Promise<void> {
    const ack = decodeMcuAck(payload);
    this.opts.relay.touch(mcuId, protocol);
    const entry = this.opts.mailbox.find(mcuId, ack.id);
    // acked before, or expired: nothing to do (docs). One past its expiry but not swept yet is
    // the sweep's: it answers FLEET_TIMEOUT, and an answer from here too would be a second reply
    if (!entry || entry.expiresAt <= this.now()) return;
    // the reply is stored before the command leaves the mailbox: a crash in between makes
    // the MCU's resent ack produce the reply again (a duplicate), never lose it
    if (entry.name.startsWith('fw.')) {
      await this.opts.firmware?.onAck(mcuId, entry, ack);
    } else {
      const reply: Omit<CommandReply, 'mid'> = { v: 1, id: ack.id, ok: ack.ok };
      if (ack.ok && ack.r !== undefined) reply.result = ack.r;
      // FLEET_MCU_COMMAND is a stable code (core/errors.ts); an MCU's own code is passed on as it is
      if (!ack.ok) reply.error = { code: ack.code ?? 'FLEET_MCU_COMMAND', message: ack.e ?? 'the MCU refused the command' };
      await this.opts.relay.append(mcuId, 'reply', Priority.ALERT, (mid) => encodeMessage({ ...reply, mid }));
    }
    if (await this.opts.mailbox.remove(mcuId, ack.id)) this.opts.onMailbox?.('acked');
  }

  /** A log or crash dump: text lines, or base64 lines for anything else (docs "Uploads"). */
  async upload(mcuId: string, protocol: McuProtocol, payload: Buffer, text: boolean): Promise<void> {
    const now = this.now();
    this.opts.relay.touch(mcuId, protocol);
    let lines: string[];
    let decoded: string | undefined;
    if (text) {
      try {
        decoded = new TextDecoder('utf-8', { fatal: true }).decode(payload);
      } catch {
        decoded = undefined;
      }
    }
    if (decoded !== undefined) {
      lines = decoded.split(/\r?\n/).flatMap((l) => (l.length <= MAX_LOG_LINE ? [l] : chunk(l, MAX_LOG_LINE)));
      if (lines.length > 1 && lines[lines.length - 1] === '') lines.pop();
    } else {
      lines = chunk(payload.toString('base64'), BASE64_LINE).map((l) => `base64:${l}`);
    }
    // one record per LOG_RECORD_LINES lines or LOG_RECORD_BYTES of text: a record is one
    // message at the hub, whose payload limit (1 MiB by default) an upload of up to
    // mcu.maxUploadBytes (16 MiB at most) would exceed; appended together (one group commit),
    // in order, all acknowledged before the MCU is answered
    const parts: string[][] = [];
    let part: string[] = [];
    let bytes = 0;
    let total = 0;
    for (const line of lines) {
      // the line as it is encoded: escaping can make a character six bytes (a control
      // character, \u0001) and UTF-8 up to three per UTF-16 unit
      const size = Buffer.byteLength(JSON.stringify(line)) + LOG_LINE_OVERHEAD;
      if (part.length > 0 && (part.length >= LOG_RECORD_LINES || bytes + size > LOG_RECORD_BYTES)) {
        parts.push(part);
        part = [];
        bytes = 0;
      }
      part.push(line);
      bytes += size;
      total += size;
    }
    parts.push(part);
    // the rate limit counts messages; an upload counts by what it becomes at the hub too
    // (a payload of newlines grows ~60-fold into records), one token per LOG_TOKEN_BYTES
    this.opts.rate?.charge(mcuId, Math.min(LOG_MAX_CHARGE, Math.ceil(total / LOG_TOKEN_BYTES) - 1));
    await Promise.all(
      parts.map((p) => {
        const batch: Omit<LogBatch, 'mid'> = { v: 1, ts: now, lines: p.map((line) => ({ t: now, app: 'mcu', stream: 'stderr', line })) };
        return this.opts.relay.append(mcuId, 'logs', Priority.LOG, (mid) => encodeMessage({ ...batch, mid }));
      }),
    );
  }

  /** The next command for an MCU, framed and MAC'd; null when there is none. */
  nextCommand(mcuId: string): Buffer | null {
    const entry = this.opts.mailbox.head(mcuId, this.now());
    if (!entry) return null;
    if (!entry.delivered) this.opts.onMailbox?.('delivered');
    this.opts.mailbox.markDelivered(mcuId, entry);
    return encodeMcuCommand(this.opts.keys.get(mcuId), mcuId, entry.seq, toMcuCommand(entry));
  }

  firmwareFor(mcuId: string): ServedImage | null {
    return this.opts.firmware?.imageFor(mcuId) ?? null;
  }

  firmwareServed(mcuId: string, protocol: McuProtocol, endOffset: number, bytes: number): void {
    this.opts.firmware?.served(mcuId, protocol, endOffset, bytes);
  }

  /** A command from the hub for one of our MCUs (fleet/v1/d/{mcu}/cmd). */
  async hubCommand(mcuId: string, payload: Buffer): Promise<void> {
    let cmd;
    try {
      cmd = decodeMessage('cmd', payload);
    } catch (err) {
      this.opts.log.warn('command from the hub is not valid; dropped', { mcu: mcuId, err });
      return;
    }
    const now = this.now();
    if (cmd.name.startsWith('fw.')) {
      // the gateway's own firmware commands: one from the hub would be taken for an offer (its
      // ack never relayed, its expiry never answered) and sent again on every resend
      this.opts.onMailbox?.('refused');
      return this.replyError(mcuId, cmd.id, 'FLEET_MSG_INVALID', 'command names starting with "fw." are reserved for the gateway\'s MCU firmware updates');
    }
    if (cmd.expiresAt <= now) {
      this.opts.onMailbox?.('expired');
      return this.replyError(mcuId, cmd.id, 'FLEET_TIMEOUT', 'the command had expired when it reached the gateway');
    }
    try {
      const { duplicate } = await this.opts.mailbox.enqueue(mcuId, { id: cmd.id, name: cmd.name, args: cmd.args, expiresAt: cmd.expiresAt }, now);
      if (!duplicate) this.opts.onMailbox?.('queued');
    } catch (err) {
      if (!isFleetError(err, 'FLEET_MCU_MAILBOX_FULL')) throw err;
      this.opts.onMailbox?.('refused');
      await this.replyError(mcuId, cmd.id, err.code, err.message);
    }
  }

  /** Put a gateway-originated command (fw.*) into the mailbox. */
  async enqueueInternal(mcuId: string, cmd: { id: string; name: string; args: Record<string, unknown>; expiresAt: number }): Promise<MailboxEntry> {
    const { entry, duplicate } = await this.opts.mailbox.enqueue(mcuId, cmd, this.now());
    if (!duplicate) this.opts.onMailbox?.('queued');
    return entry;
  }

  /** Take a gateway-originated command back out of the mailbox (a firmware offer no longer wanted). */
  async withdrawInternal(mcuId: string, id: string): Promise<void> {
    if (await this.opts.mailbox.remove(mcuId, id)) this.opts.onMailbox?.('withdrawn');
  }

  private async replyError(mcuId: string, id: string, code: string, message: string): Promise<void> {
    try {
      await this.opts.relay.append(mcuId, 'reply', Priority.ALERT, (mid) => encodeMessage({ v: 1, mid, id, ok: false, error: { code, message } } satisfies CommandReply));
    } catch (err) {
      this.opts.log.error('cannot queue a command reply for the hub', { mcu: mcuId, id, err });
    }
  }

  /** Expired commands: out of the mailbox, FLEET_TIMEOUT to the hub; idle rate-limit buckets forgotten. */
  async sweep(): Promise<void> {
    if (this.sweeping) return;
    this.sweeping = true;
    this.opts.rate?.sweep();
    try {
      for (const { mcuId, entry } of this.opts.mailbox.expired(this.now())) {
        // answered first, removed after: a crash in between answers twice, never not at all;
        // one that cannot be answered now stays for the next sweep, the others go on
        try {
          if (entry.name.startsWith('fw.')) await this.opts.firmware?.onExpired(mcuId, entry);
          else await this.replyError(mcuId, entry.id, 'FLEET_TIMEOUT', `the MCU did not acknowledge the command before it expired${entry.delivered ? ' (it was delivered)' : ' (the MCU did not pick it up)'}`);
        } catch (err) {
          this.opts.log.warn('an expired MCU command could not be answered; trying again at the next sweep', { mcu: mcuId, command: entry.id, err });
          continue;
        }
        if (await this.opts.mailbox.remove(mcuId, entry.id)) this.opts.onMailbox?.('expired');
      }
    } catch (err) {
      this.opts.log.error('mailbox sweep failed', { err });
    } finally {
      this.sweeping = false;
    }
  }

  stop(): void {
    clearInterval(this.sweepTimer);
  }
}

function chunk(s: string, n: number): string[] {
  const out: string[] = [];
  for (let i = 0; i < s.length; i += n) out.push(s.slice(i, i + n));
  return out.length > 0 ? out : [''];
}
