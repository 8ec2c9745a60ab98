import { chmodSync, existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { dirname } from 'node:path';
import { newSecret } from './credentials.ts';
import { FleetError } from './errors.ts';

/** Read a secret file (trimmed). Refuses a file others can read: secrets live with mode 0600. */
export function readSecretFile(file: string): string {
  let text: string;
  try {
    const mode = statSync(file).mode & 0o077;
    if (mode !== 0) throw new FleetError('FLEET_CONFIG_INVALID', `${file}: secret file is readable by group or others (chmod 600 it)`);
    text = readFileSync(file, 'utf8').trim();
  } catch (err) {
    if (err instanceof FleetError) throw err;
    throw new FleetError('FLEET_CONFIG_UNREADABLE', `cannot read secret file ${file}: ${(err as Error).message}`, { cause: err });
  }
  if (text.length < 16) throw new FleetError('FLEET_CONFIG_INVALID', `${file}: secret is shorter than 16 characters`);
  return text;
}

/** Write a secret with mode 0600 (creating its directory 0700). */
export function writeSecretFile(file: string, secret: string): void {
  mkdirSync(dirname(file), { recursive: true, mode: 0o700 });
  writeFileSync(file, secret + '\n', { mode: 0o600 });
  chmodSync(file, 0o600);
}

/**
 * The secret a provisioning command derives credentials from (`fleetlet hub device-token`,
 * `fleetlet gateway mcu-key`). Unlike a server's start it does not make one when `file` is
 * missing unless `create` says so: a state directory left out or mistyped would otherwise
 * get a new secret, and the credentials printed from it work with no running hub or gateway.
 * `whose` names the server that makes the file at its first start; `created` is told of a
 * new one.
 */
export function provisioningSecret(file: string, o: { create: boolean; whose: string; created: (file: string) => void }): string {
  if (missing(file)) {
    if (!o.create) throw new FleetError('FLEET_CONFIG_UNREADABLE', `no secret at ${file}: is the state directory (--state-dir or the config's stateDir) the one the ${o.whose} uses? It makes the file at its first start; --create makes it now instead (then start the ${o.whose} with this state directory)`);
    writeSecretFile(file, newSecret());
    o.created(file);
  }
  return readSecretFile(file);
}

/** The file does not exist (ENOENT only: one that cannot be read for another reason, EACCES, is reported by readSecretFile as that). */
function missing(file: string): boolean {
  try {
    statSync(file);
    return false;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'ENOENT';
  }
}

/** A device's hub token (agent, gateway): a missing file says how to make one. */
export function readDeviceToken(file: string, deviceId: string): string {
  if (missing(file)) throw new FleetError('FLEET_CONFIG_UNREADABLE', `no device token at ${file}: make it on the hub with \`fleetlet hub device-token ${deviceId} --out <file>\` and copy it here (mode 0600), or point hub.tokenFile (--token-file) at it`);
  return readSecretFile(file);
}

/** The secret in `file`, generating a new random one on first use. */
export function loadOrCreateSecret(file: string): string {
  if (!existsSync(file)) writeSecretFile(file, newSecret());
  return readSecretFile(file);
}
