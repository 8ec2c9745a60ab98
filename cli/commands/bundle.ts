import { readFileSync, writeFileSync } from 'node:fs';
import { FleetError } from '../../core/errors.ts';
import { generateKeyFiles, loadPrivateKey, loadPublicKey, signBytes, verifyBytes } from '../../bundles/sign.ts';
import { defineCommand, EXIT, strFlag } from '../command.ts';

function readInput(file: string): Buffer {
  try {
    return readFileSync(file);
  } catch (err) {
    throw new FleetError('FLEET_USAGE', `cannot read ${file}: ${(err as Error).message}`);
  }
}

export const bundleCommand = defineCommand({
  name: 'bundle',
  summary: 'Ed25519 keys and signatures for update bundles (keygen, sign, verify)',
  usage: 'keygen --out BASE | sign --key BASE.key FILE | verify --pub BASE.pub FILE [--sig FILE.sig]',
  positionals: true,
  options: {
    out: { type: 'string' },
    key: { type: 'string' },
    pub: { type: 'string' },
    sig: { type: 'string' },
    json: { type: 'boolean' },
  },
  help: {
    out: 'keygen: write BASE.key (0600) and BASE.pub',
    key: 'sign: private key (PEM, PKCS#8)',
    pub: 'verify: public key (PEM, SPKI)',
    sig: 'signature file (default FILE.sig)',
    json: 'print the result as JSON',
  },
  async run({ values, positionals }) {
    const [sub, ...rest] = positionals;
    const print = (obj: Record<string, unknown>, text: string) => process.stdout.write(values.json ? JSON.stringify(obj) + '\n' : text + '\n');
    const file = () => {
      if (rest.length !== 1) throw new FleetError('FLEET_USAGE', `bundle ${sub}: exactly one FILE expected`);
      return rest[0]!;
    };
    const need = (name: string) => {
      const v = strFlag(values, name);
      if (!v) throw new FleetError('FLEET_USAGE', `bundle ${sub}: --${name} is required`);
      return v;
    };
    switch (sub) {
      case 'keygen': {
        const files = generateKeyFiles(need('out'));
        print(files, `wrote ${files.privateFile} (keep secret) and ${files.publicFile}`);
        return EXIT.OK;
      }
      case 'sign': {
        const f = file();
        const sigFile = strFlag(values, 'sig') ?? `${f}.sig`;
        writeFileSync(sigFile, signBytes(loadPrivateKey(need('key')), readInput(f)));
        print({ file: f, signature: sigFile }, `signed ${f} → ${sigFile}`);
        return EXIT.OK;
      }
      case 'verify': {
        const f = file();
        const sigFile = strFlag(values, 'sig') ?? `${f}.sig`;
        verifyBytes(loadPublicKey(need('pub')), readInput(f), readInput(sigFile));
        print({ file: f, ok: true }, `ok: ${f} is signed by ${strFlag(values, 'pub')}`);
        return EXIT.OK;
      }
      default:
        throw new FleetError('FLEET_USAGE', sub ? `unknown bundle subcommand "${sub}"` : 'bundle: a subcommand is required (keygen, sign, verify)');
    }
  },
});
