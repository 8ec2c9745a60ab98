import { readFileSync, statSync } from 'node:fs';
import { createSecureContext } from 'node:tls';
import { FleetError } from './errors.ts';
import type { Logger } from './log.ts';

/**
 * Read and check a TLS certificate and key named in a config (`prefix` is the config key
 * holding them, e.g. `mcu.mqttTls` or `tls`). A file that cannot be read or parsed, or a key
 * that does not belong to the certificate, fails the start with FLEET_CONFIG_INVALID naming
 * the config key and the file; a key file others can read is logged as a warning.
 */
export function loadTlsPair(paths: { cert: string; key: string }, prefix: string, log: Logger): { cert: Buffer; key: Buffer } {
  const bad = (keys: Array<'cert' | 'key'>, msg: string, cause: unknown) =>
    new FleetError('FLEET_CONFIG_INVALID', `${keys.map((k) => `${prefix}.${k}`).join(' and ')}: ${msg}`, {
      cause,
      details: { keys: keys.map((k) => `${prefix}.${k}`), files: keys.map((k) => paths[k]) },
    });
  const load = (k: 'cert' | 'key'): Buffer => {
    let pem: Buffer;
    try {
      pem = readFileSync(paths[k]);
    } catch (err) {
      throw bad([k], `cannot read ${paths[k]}: ${(err as Error).message}`, err);
    }
    try {
      createSecureContext(k === 'cert' ? { cert: pem } : { key: pem });
    } catch (err) {
      throw bad([k], `${paths[k]} is not a PEM ${k === 'cert' ? 'certificate' : 'private key'}: ${(err as Error).message}`, err);
    }
    return pem;
  };
  const cert = load('cert');
  const key = load('key');
  try {
    createSecureContext({ cert, key });
  } catch (err) {
    throw bad(['cert', 'key'], `the key ${paths.key} does not belong to the certificate ${paths.cert}: ${(err as Error).message}`, err);
  }
  if ((statSync(paths.key).mode & 0o077) !== 0) log.warn(`the TLS key file (${prefix}.key) can be read by other users; make it mode 0600`, { file: paths.key });
  return { cert, key };
}
