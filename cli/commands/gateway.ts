import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { mkdir, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { loadTrustRoot, verifyBundle } from '../../bundles/index.ts';
import { loadConfig, logLevelFromEnv } from '../../core/config.ts';
import { FleetError, isFleetError } from '../../core/errors.ts';
import { tuneServerHeap } from '../../core/heap-tuning.ts';
import { createLogger } from '../../core/log.ts';
import { runUntilSignal, writeReadyFile } from '../../core/proc.ts';
import { provisioningSecret } from '../../core/secrets.ts';
import { assertDeviceId } from '../../core/topics.ts';
import { mcuKey } from '../../firmware-bridge/auth.ts';
import { gatewayPaths, GatewayConfigSchema } from '../../gateway/config.ts';
import { startGateway, type VerifyFirmware } from '../../gateway/index.ts';
import { editRevokedList } from '../../gateway/revocations.ts';
import { defineCommand, EXIT, intFlag, strFlag } from '../command.ts';
import { VERSION } from '../version.ts';

export const gatewayCommand = defineCommand({
  name: 'gateway',
  summary: 'run an MCU gateway: ESP32s over MQTT/CoAP in, store-and-forward to the hub (or: gateway mcu-key | revoke | unrevoke <id>)',
  usage: '[--config gateway.yaml] [options]\n       fleetlet gateway mcu-key <mcu-id> [--site-secret-file FILE | --state-dir DIR]\n       fleetlet gateway revoke|unrevoke <mcu-id>... [--config gateway.yaml | --state-dir DIR]',
  positionals: true,
  options: {
    config: { type: 'string', short: 'c' },
    hub: { type: 'string' },
    id: { type: 'string' },
    'token-file': { type: 'string' },
    'site-secret-file': { type: 'string' },
    host: { type: 'string' },
    'mqtt-port': { type: 'string' },
    'coap-port': { type: 'string' },
    'http-port': { type: 'string' },
    'state-dir': { type: 'string' },
    'ready-file': { type: 'string' },
    'firmware-trust': { type: 'string' },
    'firmware-base-url': { type: 'string' },
    'die-with-parent': { type: 'boolean' },
    create: { type: 'boolean' },
  },
  help: {
    config: 'YAML or JSON config file (docs/config.md#gateway)',
    hub: 'hub MQTT URL (default mqtt://127.0.0.1:1883)',
    id: "this gateway's device id at the hub",
    'token-file': 'file with the device token from `fleetlet hub device-token <id>`, mode 0600 (default <state-dir>/token)',
    'site-secret-file': 'file with the secret MCU keys derive from, mode 0600, created when missing (default <state-dir>/site.secret)',
    host: 'address the MCU listeners bind (default 127.0.0.1)',
    'mqtt-port': 'MCU MQTT port (default 1884; 0 = any free port)',
    'coap-port': 'MCU CoAP port, UDP (default 5683; 0 = any free port)',
    'http-port': 'port of /metrics, /health, /ready on http.host (default: none; 0 = any free port)',
    'state-dir': 'MCU replay counters and known MCUs',
    'ready-file': 'write {pid, mqttPort, mqttTlsPort, coapPort, httpPort, siteSecretFile} here once listening',
    'firmware-trust': 'trust root (root.json) MCU firmware bundles must verify against; without it firmware updates are refused',
    'firmware-base-url': 'the hub\'s HTTP address (e.g. http://hub:8080): firmware URLs that are paths (/api/v1/artifacts/<sha256>) are fetched from it',
    'die-with-parent': 'exit when stdin closes (used by the demo)',
    create: 'mcu-key: make the site secret when the state directory has none yet (before the gateway\'s first start)',
  },
  async run({ values, positionals }) {
    const overrides = {
      deviceId: strFlag(values, 'id'),
      stateDir: strFlag(values, 'state-dir'),
      firmwareTrustFile: strFlag(values, 'firmware-trust'),
      firmwareBaseUrl: strFlag(values, 'firmware-base-url'),
      http: { port: intFlag(values, 'http-port', 0, 65535) },
      hub: { url: strFlag(values, 'hub'), tokenFile: strFlag(values, 'token-file') },
      mcu: {
        host: strFlag(values, 'host'),
        mqttPort: intFlag(values, 'mqtt-port', 0, 65535),
        coapPort: intFlag(values, 'coap-port', 0, 65535),
        siteSecretFile: strFlag(values, 'site-secret-file'),
      },
    };
    const [sub, ...args] = positionals;
    if (sub === 'mcu-key') {
      // provisioning: the key to flash into one MCU (its MQTT password and CoAP MAC key)
      if (args.length !== 1) throw new FleetError('FLEET_USAGE', 'usage: fleetlet gateway mcu-key <mcu-id>');
      const mcuId = args[0]!;
      try {
        assertDeviceId(mcuId);
      } catch (err) {
        throw new FleetError('FLEET_USAGE', `mcu-key: ${(err as Error).message}`);
      }
      // the gateway's own id is not needed to derive an MCU key
      const schema = GatewayConfigSchema.extend({ deviceId: GatewayConfigSchema.shape.deviceId.optional() });
      const { config } = loadConfig(schema, { file: strFlag(values, 'config'), overrides });
      const site = provisioningSecret(gatewayPaths(config).siteSecretFile, { create: values.create === true, whose: 'gateway', created: (f) => process.stderr.write(`created a new site secret at ${f}\n`) });
      process.stdout.write(mcuKey(site, mcuId) + '\n');
      return EXIT.OK;
    }
    if (sub === 'revoke' || sub === 'unrevoke') {
      // the revoked list a running gateway polls (docs/mcu-protocol.md "Revoking one MCU")
      if (args.length === 0) throw new FleetError('FLEET_USAGE', `usage: fleetlet gateway ${sub} <mcu-id>...`);
      const schema = GatewayConfigSchema.extend({ deviceId: GatewayConfigSchema.shape.deviceId.optional() });
      const { config } = loadConfig(schema, { file: strFlag(values, 'config'), overrides });
      const file = gatewayPaths(config).revokedFile;
      let change: { added: string[]; removed: string[] };
      try {
        change = sub === 'revoke' ? editRevokedList(file, args, []) : editRevokedList(file, [], args);
      } catch (err) {
        if (isFleetError(err, 'FLEET_DEVICE_ID_INVALID')) throw new FleetError('FLEET_USAGE', `${sub}: ${err.message}`);
        throw err;
      }
      const done = sub === 'revoke' ? change.added : change.removed;
      const unchanged = args.filter((id) => !done.includes(id));
      process.stdout.write(`${file}: ${sub === 'revoke' ? 'revoked' : 'no longer revoked'}: ${done.join(' ') || '(none)'}${unchanged.length > 0 ? `; unchanged: ${unchanged.join(' ')}` : ''}\n`);
      return EXIT.OK;
    }
    if (sub !== undefined) throw new FleetError('FLEET_USAGE', `unknown gateway subcommand "${sub}"`);
    const { config } = loadConfig(GatewayConfigSchema, { file: strFlag(values, 'config'), overrides });
    const log = createLogger({ name: 'gateway', level: logLevelFromEnv() ?? 'info' });
    tuneServerHeap();
    const gw = await startGateway(config, log, VERSION, { verifyFirmware: config.firmwareTrustFile ? firmwareVerifier(config.firmwareTrustFile, join(config.stateDir, 'firmware')) : undefined });
    writeReadyFile(strFlag(values, 'ready-file'), { mqttPort: gw.mqttPort, mqttTlsPort: gw.mqttTlsPort, coapPort: gw.coapPort, httpPort: gw.httpPort ?? null, siteSecretFile: gw.siteSecretFile });
    return runUntilSignal(() => gw.stop(), { dieWithParent: values['die-with-parent'] === true });
  },
});

/**
 * The gateway's firmware check, built here because gateway/ may not import bundles/
 * (DESIGN.md layout): a signed bundle of kind firmware, verified against the trust root
 * (read at each use, so a rotated root applies without a restart), whose single file —
 * or the file named firmware.bin — is the MCU image.
 */
export function firmwareVerifier(trustFile: string, workDir: string): VerifyFirmware {
  const verify: VerifyFirmware = async (file) => {
    const verified = await verifyBundle(file, { trust: loadTrustRoot(trustFile), kind: 'firmware' });
    const files = verified.manifest.files;
    const image = files.length === 1 ? files[0] : files.find((f) => f.path === 'firmware.bin');
    if (!image) throw new FleetError('FLEET_MCU_FIRMWARE', 'a firmware bundle holds one file, or a file named firmware.bin');
    const dir = join(workDir, `extract-${verified.sha256}`);
    await mkdir(workDir, { recursive: true, mode: 0o700 });
    await rm(dir, { recursive: true, force: true });
    try {
      await verified.extractTo(dir);
      return { version: verified.manifest.version, image: await readFile(join(dir, image.path)), name: verified.manifest.name, sequence: verified.manifest.sequence, expires: Date.parse(verified.manifest.expires), deviceClass: verified.manifest.targets.deviceClass };
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  };
  // the root's bytes name it: a rotated root makes the gateway verify cached bundles again
  // before it offers them. Unreadable: named by why (no verification made under a readable
  // root matches it, so the next one says what is wrong with the file), and the same name
  // while the cause stays, so the gateway waits for a change instead of retrying each tick
  verify.trustVersion = () => {
    try {
      return createHash('sha256').update(readFileSync(trustFile)).digest('hex');
    } catch (err) {
      return `unreadable:${(err as NodeJS.ErrnoException).code ?? 'error'}`;
    }
  };
  return verify;
}
