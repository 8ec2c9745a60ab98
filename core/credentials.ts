import { createHmac, randomBytes } from 'node:crypto';
import { assertDeviceId } from './topics.ts';

/**
 * Device credentials derived from a fleet secret: token = HMAC-SHA256(secret, "fleetlet-device:v1:" + id),
 * base64url. The hub holds only the secret and can check any device's token without a
 * lookup; `fleetlet hub device-token <id>` prints a token for provisioning. Rotating the
 * fleet secret revokes every device token at once; per-device revocation is a deny list
 * in the registry (docs/security.md).
 *
 * The same derivation, with a different label, gives MCUs their per-device keys from a
 * gateway's site secret.
 */
export type CredentialLabel = 'device' | 'mcu' | 'operator';

export function deriveToken(secret: string, label: CredentialLabel, id: string): string {
  assertDeviceId(id);
  return createHmac('sha256', secret).update(`fleetlet-${label}:v1:${id}`).digest('base64url');
}

export function newSecret(bytes = 32): string {
  return randomBytes(bytes).toString('base64url');
}
