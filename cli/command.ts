import { parseArgs, type ParseArgsConfig } from 'node:util';
import { FleetError } from '../core/errors.ts';

/**
 * One CLI command. Options use node:util parseArgs in strict mode, so an unknown flag
 * or a missing value is a FLEET_USAGE error (exit code 2). `--help` is added to every
 * command. Exit codes: 0 ok, 1 failure (a FleetError with its code is printed), 2 usage,
 * 130 interrupted.
 */
export type Options = NonNullable<ParseArgsConfig['options']>;

export interface CommandSpec<O extends Options = Options> {
  name: string;
  summary: string;
  /** usage line after `fleetlet <name>` */
  usage: string;
  /** one line of help per option, keyed by option name */
  help: Record<keyof O & string, string>;
  options: O;
  /** positional arguments allowed (default false) */
  positionals?: boolean;
  /** hidden from `fleetlet --help` (internal helper commands) */
  hidden?: boolean;
  run(args: { values: Record<string, string | boolean | string[] | boolean[] | undefined>; positionals: string[] }): Promise<number>;
}

export const EXIT = { OK: 0, FAILURE: 1, USAGE: 2, INTERRUPTED: 130 } as const;

export function defineCommand<O extends Options>(spec: CommandSpec<O>): CommandSpec {
  return spec as unknown as CommandSpec;
}

export function commandHelp(spec: CommandSpec): string {
  const lines = [`fleetlet ${spec.name} — ${spec.summary}`, '', `usage: fleetlet ${spec.name} ${spec.usage}`.trimEnd(), '', 'options:'];
  const opts = { ...spec.options, help: { type: 'boolean' as const, short: 'h' } };
  const help: Record<string, string> = { ...spec.help, help: 'show this help' };
  for (const [name, o] of Object.entries(opts)) {
    const flag = `${o.short ? `-${o.short}, ` : '    '}--${name}${(o.type as string) === 'string' ? ' <value>' : ''}`;
    const def = 'default' in o && o.default !== undefined ? ` (default: ${String(o.default)})` : '';
    lines.push(`  ${flag.padEnd(30)} ${help[name] ?? ''}${def}`);
  }
  return lines.join('\n') + '\n';
}

export function parseCommandArgs(spec: CommandSpec, argv: string[]): { help: boolean; values: Record<string, string | boolean | string[] | boolean[] | undefined>; positionals: string[] } {
  try {
    const { values, positionals } = parseArgs({
      args: argv,
      options: { ...spec.options, help: { type: 'boolean', short: 'h' } },
      strict: true,
      allowPositionals: spec.positionals ?? false,
    });
    const { help, ...rest } = values as Record<string, string | boolean | undefined>;
    return { help: help === true, values: rest, positionals };
  } catch (err) {
    throw new FleetError('FLEET_USAGE', `fleetlet ${spec.name}: ${(err as Error).message}`, { cause: err });
  }
}

/** Parse an integer flag value, with a FLEET_USAGE error naming the flag. */
export function intFlag(values: Record<string, unknown>, name: string, min = 0, max = Number.MAX_SAFE_INTEGER): number | undefined {
  const raw = values[name];
  if (raw === undefined) return undefined;
  const n = Number(raw);
  if (!Number.isInteger(n) || n < min || n > max) throw new FleetError('FLEET_USAGE', `--${name}: expected an integer from ${min} to ${max}, got ${JSON.stringify(raw)}`);
  return n;
}

export function strFlag(values: Record<string, unknown>, name: string): string | undefined {
  const v = values[name];
  return typeof v === 'string' ? v : undefined;
}
