import type { Sample } from '../core/messages.ts';

/** One simulated sensor reading: what a device measures every period. */
export interface Reading {
  /** sample time, ms since the epoch (the device clock; the benchmark's latency starts here) */
  t: number;
  /** °C, 2 decimals */
  temperature: number;
  /** %RH, 1 decimal */
  humidity: number;
  /** dBm, an integer */
  rssi: number;
  /** s since boot */
  uptime: number;
  /** the reading's id: (device, seq) names one message end to end, for loss and duplicate counts */
  seq: number;
}

/** The reading as fleet samples, for the generic encoders (SenML CBOR, compact). */
export function readingSamples(r: Reading): Sample[] {
  return [
    { n: 'temperature', u: 'Cel', v: r.temperature, t: r.t },
    { n: 'humidity', u: '%RH', v: r.humidity, t: r.t },
    { n: 'rssi', u: 'dBm', v: r.rssi, t: r.t },
    { n: 'uptime', u: 's', v: r.uptime, t: r.t },
    { n: 'seq', v: r.seq, t: r.t },
  ];
}

/**
 * The reading in SenML JSON, byte for byte what `encodeSenmlJson(readingSamples(r))`
 * (firmware-bridge/senml.ts) writes — base time in the first record, no per-record
 * times — but built as one string: the generic encoder's records and JSON.stringify were
 * a large share of the simulator's CPU at 10,000 readings/s. Numbers print the same in a
 * template as in JSON.stringify (both use Number::toString for finite numbers);
 * test/esp32-sim/reading.test.ts checks the equality.
 */
export function encodeReadingSenmlJson(r: Reading): Buffer {
  const s = `[{"bt":${r.t / 1000},"n":"temperature","u":"Cel","v":${r.temperature}},{"n":"humidity","u":"%RH","v":${r.humidity}},{"n":"rssi","u":"dBm","v":${r.rssi}},{"n":"uptime","u":"s","v":${r.uptime}},{"n":"seq","v":${r.seq}}]`;
  // ASCII only: latin1 is the cheapest encoding and the same bytes as UTF-8
  return Buffer.from(s, 'latin1');
}
