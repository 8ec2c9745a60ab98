/**
 * The MCU contract (docs/mcu-protocol.md): what an ESP32 sends to and receives from a
 * gateway. Pure functions and data only — no sockets, no imports from gateway/ or
 * esp32-sim/ — so the gateway, the simulator and tests share one definition.
 */
export * from './topics.ts';
export * from './senml.ts';
export * from './auth.ts';
export * from './coap.ts';
export * from './codecs.ts';
export * from './frames.ts';
