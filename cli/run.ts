import { commandHelp, EXIT, parseCommandArgs, type CommandSpec } from './command.ts';
import { FleetError, toFleetError } from '../core/errors.ts';
import { VERSION } from './version.ts';
import type { CommandEntry } from './commands/index.ts';

async function topHelp(commands: readonly CommandEntry[]): Promise<string> {
  const lines = [`fleetlet ${VERSION} — edge-first fleet runtime`, '', 'usage: fleetlet <command> [options]', '', 'commands:'];
  // the summaries live with each command: load them all (only for this help page)
  const specs = await Promise.all(commands.filter((c) => !c.hidden).map((c) => c.load()));
  for (const c of specs) lines.push(`  ${c.name.padEnd(10)} ${c.summary}`);
  lines.push('', 'global: --version, --help; `fleetlet <command> --help` for each command.', 'exit codes: 0 ok, 1 failure, 2 usage error, 130 interrupted.');
  return lines.join('\n') + '\n';
}

export async function main(commands: readonly CommandEntry[], argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (name === undefined || name === '--help' || name === '-h' || name === 'help') {
    process.stdout.write(await topHelp(commands));
    return name === undefined ? EXIT.USAGE : EXIT.OK;
  }
  if (name === '--version' || name === '-v' || name === 'version') {
    process.stdout.write(`fleetlet ${VERSION}\n`);
    return EXIT.OK;
  }
  const entry = commands.find((c) => c.name === name);
  try {
    const spec: CommandSpec | undefined = await entry?.load();
    if (!spec) throw new FleetError('FLEET_USAGE', `unknown command "${name}"; run \`fleetlet --help\` for the list`);
    const args = parseCommandArgs(spec, rest);
    if (args.help) {
      process.stdout.write(commandHelp(spec));
      return EXIT.OK;
    }
    return await spec.run(args);
  } catch (err) {
    const fe = toFleetError(err);
    process.stderr.write(`fleetlet: error ${fe.code}: ${fe.message}\n`);
    if (fe.code === 'FLEET_INTERNAL' && fe.cause instanceof Error && fe.cause.stack) process.stderr.write(fe.cause.stack + '\n');
    return fe.code === 'FLEET_USAGE' ? EXIT.USAGE : EXIT.FAILURE;
  }
}

/** Run the command line with these commands, then exit with its code. */
export function runCli(commands: readonly CommandEntry[]): void {
  main(commands, process.argv.slice(2)).then(
    (code) => {
      // Commands resolve when they are done (long-running ones after their orderly stop).
      // Exit explicitly: a handle nobody needs any more (the stdin pipe of --die-with-parent,
      // a library's timer) must not keep a stopped part alive. stdout/stderr writes to
      // pipes and files are synchronous on Linux, so nothing printed is lost.
      process.exitCode = code;
      setImmediate(() => process.exit(code));
    },
    (err: unknown) => {
      process.stderr.write(`fleetlet: fatal: ${String(err)}\n`);
      process.exit(EXIT.FAILURE);
    },
  );
}
