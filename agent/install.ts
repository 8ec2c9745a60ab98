import { chmodSync, copyFileSync, lstatSync, mkdirSync, readFileSync, readlinkSync, renameSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { dirname, isAbsolute, join } from 'node:path';
import { loadConfig } from '../core/config.ts';
import { newSecret } from '../core/credentials.ts';
import { FleetError } from '../core/errors.ts';
import { AgentConfigSchema } from './config.ts';

/**
 * `fleetlet agent install`: a hardened systemd unit, a default config, the local API
 * tokens, and the binary at a stable path (docs/agent.md#install).
 *
 * Plan, then execute (STYLE.md): `planInstall` looks at the target file system and
 * returns the steps (pure apart from reading what exists); `executeInstall` applies them.
 * `--dry-run` prints the plan. `prefix` is a DESTDIR: every file is written under it,
 * while the paths inside the unit and the config are the real ones, so a package build
 * or a test can install into a temp dir.
 *
 * The binary goes where the agent updater expects it (agent/update/layout.ts):
 *   <stateDir>/agent/releases/<version>-s0/fleetlet, <stateDir>/agent/current -> releases/<version>-s0
 * and ExecStart runs <stateDir>/agent/current/fleetlet. The state directory is the only
 * writable path under ProtectSystem=strict, so self-update can switch the binary there.
 */

export const UNIT_NAME = 'fleetlet-agent.service';

export interface InstallOptions {
  /** DESTDIR-style root for every written file ('' = the real root) */
  prefix: string;
  unitDir: string;
  configFile: string;
  stateDir: string;
  /** the binary to install (this executable inside the single binary); null: install none */
  binSource: string | null;
  /** a convenience symlink to the current binary for the CLI (e.g. /usr/local/bin/fleetlet); null: none */
  linkPath: string | null;
  /** paths besides the state dir that apps may write (ReadWritePaths=) */
  readWritePaths: string[];
  version: string;
  force: boolean;
  /** restart delay of the unit, seconds */
  restartSec: number;
}

export const INSTALL_DEFAULTS = {
  prefix: '',
  unitDir: '/etc/systemd/system',
  configFile: '/etc/fleetlet/agent.yaml',
  stateDir: '/var/lib/fleetlet/agent',
  linkPath: '/usr/local/bin/fleetlet',
  restartSec: 2,
} as const;

export type InstallStep =
  | { kind: 'mkdir'; path: string; mode: number }
  | { kind: 'write'; path: string; mode: number; content: string; replaces: boolean; what: string }
  | { kind: 'copy'; path: string; mode: number; from: string; what: string }
  | { kind: 'symlink'; path: string; target: string; replaces: boolean; what: string }
  | { kind: 'token'; path: string; role: string }
  | { kind: 'keep'; path: string; why: string };

export interface InstallPlan {
  steps: InstallStep[];
  /** things the operator should know (a kept config that disagrees with the unit, no binary, …) */
  notes: string[];
  /** real (unprefixed) paths */
  paths: { unit: string; config: string; stateDir: string; exec: string; tokens: { technician: string; readonly: string }; link: string | null };
}

function abs(what: string, p: string): string {
  if (!isAbsolute(p)) throw new FleetError('FLEET_USAGE', `${what} must be an absolute path, got ${JSON.stringify(p)}`);
  return p;
}

/** systemd unit paths may not hold whitespace or specifiers unescaped; keep them plain */
function unitPath(what: string, p: string): string {
  abs(what, p);
  if (/[\s%"'\\]/.test(p)) throw new FleetError('FLEET_USAGE', `${what} ${JSON.stringify(p)}: use a path without spaces, quotes, backslashes or %`);
  return p;
}

/**
 * The unit. Hardening is chosen for a supervisor of arbitrary apps, which inherit the
 * service's sandbox (docs/agent.md#install explains each choice):
 *  - kept: NoNewPrivileges (the agent switches users with setuid() as root, which NNP allows;
 *    setuid helpers such as sudo inside apps stop working), ProtectSystem=strict with the state
 *    dir writable, ProtectHome=read-only (apps often live in /home/pi), PrivateTmp,
 *    ProtectKernelTunables (leaves /sys/fs/cgroup writable for Delegate=yes),
 *    ProtectKernelModules, RestrictSUIDSGID, LockPersonality;
 *  - left out on purpose: ProtectControlGroups (would make the delegated cgroup read-only:
 *    no limits), MemoryDenyWriteExecute (V8's JIT needs W+X pages; the agent would not start),
 *    PrivateDevices (GPIO, I2C, serial, GPUs), PrivateUsers / User= (apps run as other users),
 *    CapabilityBoundingSet, SystemCallFilter, RestrictRealtime, RestrictNamespaces (apps
 *    would lose what they legitimately use: bind low ports, real-time robotics, containers).
 */
export function renderUnit(o: { execPath: string; committedPath: string; configFile: string; stateDir: string; readWritePaths: string[]; restartSec: number; version: string }): string {
  const rw = [o.stateDir, ...o.readWritePaths].map((p) => unitPath('a ReadWritePaths entry', p));
  return `# Written by \`fleetlet agent install\` (fleetlet ${o.version}). Re-running the install rewrites it;
# put local changes in a drop-in: systemctl edit fleetlet-agent
[Unit]
Description=fleetlet device agent
Documentation=https://github.com/fleetlet/fleetlet/blob/main/docs/agent.md
Wants=network-online.target
After=network-online.target
# Restart=always forever: no start-rate limit that would leave a device without its agent
StartLimitIntervalSec=0

[Service]
Type=simple
# the self-update boot counter (docs/ota.md#agent-self-update), run by the last binary known to
# work before every start; '-': it never blocks the start
ExecStartPre=-${unitPath('the committed binary path', o.committedPath)} agent boot-check --config ${unitPath('the config path', o.configFile)}
ExecStart=${unitPath('the binary path', o.execPath)} agent --config ${unitPath('the config path', o.configFile)}
Restart=always
RestartSec=${o.restartSec}
# Stop and crash alike: SIGTERM to every process of the service's cgroup (agent and apps),
# SIGKILL to whatever is left after TimeoutStopSec, so no app outlives the agent.
# TimeoutStopSec covers the largest app stopTimeoutMs with room to spare.
KillMode=control-group
KillSignal=SIGTERM
TimeoutStopSec=90
# the agent creates one cgroup v2 child per app for memory and CPU limits
Delegate=yes
Environment=FLEETLET_LOG_LEVEL=info
# glibc: at most 2 malloc arenas for the agent (one per thread by default: the agent's
# threads are idle most of the time and each arena keeps its own free memory; about 1 MiB
# less RSS, scripts/bench/README.md). For the agent alone: its apps do not inherit the
# variables FLEETLET_AGENT_ONLY_ENV names (an app sets its own in its env).
Environment=MALLOC_ARENA_MAX=2
Environment=FLEETLET_AGENT_ONLY_ENV=MALLOC_ARENA_MAX

# Hardening. Apps inherit all of this (see docs/agent.md#install before adding more).
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths=${rw.join(' ')}
ProtectHome=read-only
PrivateTmp=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
RestrictSUIDSGID=yes
LockPersonality=yes

[Install]
WantedBy=multi-user.target
`;
}

/** The default config: valid as written, every key commented. */
export function renderDefaultConfig(o: { stateDir: string; version: string }): string {
  return `# fleetlet agent configuration (docs/config.md#agent), read once at start:
# after an edit, \`systemctl restart fleetlet-agent\`.
# Written by \`fleetlet agent install\` (fleetlet ${o.version}); a later install keeps it
# unless run with --force.

# This device's id in the fleet: letters, digits, '.', '_' and '-', at most 64.
# Default: the host name.
# deviceId: pi-line3-01

# Outbox, API tokens, app logs and agent releases live here. It must match
# ReadWritePaths= in the systemd unit: it is the only place the agent may write.
stateDir: ${JSON.stringify(o.stateDir)}

# The hub. Without it the agent works offline-only (supervision, metrics and the local
# API still work; nothing is queued for upload).
# hub:
#   url: mqtts://hub.example.com:8883
#   tokenFile: ${o.stateDir}/hub.token     # this device's hub token, mode 0600
#   keepaliveS: 30

# The technician's API and page. On any address other than 127.0.0.1 every call needs a
# token: ${o.stateDir}/tokens/readonly.token or technician.token.
api:
  host: 127.0.0.1
  port: 8484

metrics:
  sampleMs: 1000      # device and app figures, read from /proc at this period (ms)
  publishMs: 10000    # one telemetry batch to the hub per period (ms)

# Supervised apps (docs/agent.md#supervision), e.g.:
#  - name: sensor-reader
#    command: /opt/sensor/bin/reader
#    args: ["--port", "/dev/ttyUSB0"]
#    restart: always           # always | on-failure | never
#    stopTimeoutMs: 10000      # SIGTERM to the app's process group, then SIGKILL
apps: []
`;
}

/** What is on the target file system: injectable so the planner stays testable. */
export interface FsProbe {
  exists(path: string): boolean;
  readlink(path: string): string | null;
  read(path: string): string | null;
}

export const realFs: FsProbe = {
  exists: (p) => {
    try {
      lstatSync(p);
      return true;
    } catch {
      return false;
    }
  },
  readlink: (p) => {
    try {
      return readlinkSync(p);
    } catch {
      return null;
    }
  },
  read: (p) => {
    try {
      return readFileSync(p, 'utf8');
    } catch {
      return null;
    }
  },
};

export function planInstall(o: InstallOptions, fs: FsProbe = realFs): InstallPlan {
  const stateDir = unitPath('--state-dir', o.stateDir);
  const configFile = unitPath('--config', o.configFile);
  const unitDir = abs('--unit-dir', o.unitDir);
  const P = (p: string) => (o.prefix ? join(o.prefix, p) : p);
  const release = `${o.version}-s0`;
  const paths: InstallPlan['paths'] = {
    unit: join(unitDir, UNIT_NAME),
    config: configFile,
    stateDir,
    exec: join(stateDir, 'agent', 'current', 'fleetlet'),
    tokens: { technician: join(stateDir, 'tokens', 'technician.token'), readonly: join(stateDir, 'tokens', 'readonly.token') },
    link: o.linkPath ? abs('--link', o.linkPath) : null,
  };
  const steps: InstallStep[] = [];
  const notes: string[] = [];

  steps.push({ kind: 'mkdir', path: P(stateDir), mode: 0o700 });
  for (const [role, file] of Object.entries(paths.tokens)) {
    // tokens are never replaced, --force or not: a technician's saved token keeps working.
    // To rotate one, delete its file and install again (or restart the agent).
    if (fs.exists(P(file))) steps.push({ kind: 'keep', path: P(file), why: `${role} token exists (delete it to rotate)` });
    else steps.push({ kind: 'token', path: P(file), role });
  }

  // the binary, where the updater switches it
  const currentLink = join(stateDir, 'agent', 'current');
  const current = fs.readlink(P(currentLink));
  if (o.binSource) {
    const target = join(stateDir, 'agent', 'releases', release, 'fleetlet');
    steps.push({ kind: 'mkdir', path: P(dirname(target)), mode: 0o755 });
    steps.push({ kind: 'copy', path: P(target), from: o.binSource, mode: 0o755, what: `fleetlet ${o.version}` });
    if (current !== null && !o.force) {
      steps.push({ kind: 'keep', path: P(currentLink), why: `points at ${current} (the updater's choice; --force switches it to ${release})` });
    } else {
      steps.push({ kind: 'symlink', path: P(currentLink), target: join('releases', release), replaces: current !== null, what: 'current agent release' });
      steps.push({ kind: 'symlink', path: P(join(stateDir, 'agent', 'committed')), target: join('releases', release), replaces: fs.readlink(P(join(stateDir, 'agent', 'committed'))) !== null, what: 'last agent release known good' });
    }
  } else if (current === null) {
    notes.push(`no binary installed (not running from the single executable and no --bin): put one at ${join(stateDir, 'agent', 'releases', release, 'fleetlet')} and point ${currentLink} at its directory before starting the unit`);
  }
  if (paths.link) {
    const have = fs.readlink(P(paths.link));
    if (have === paths.exec) steps.push({ kind: 'keep', path: P(paths.link), why: 'already links to the current agent' });
    else if (fs.exists(P(paths.link)) && !o.force) steps.push({ kind: 'keep', path: P(paths.link), why: `exists and is not ours (${have ?? 'a file'}); --force replaces it` });
    else steps.push({ kind: 'symlink', path: P(paths.link), target: paths.exec, replaces: fs.exists(P(paths.link)), what: 'fleetlet on the PATH' });
  }

  // the config: never overwritten without --force
  const haveConfig = fs.read(P(configFile));
  if (haveConfig !== null && !o.force) {
    steps.push({ kind: 'keep', path: P(configFile), why: 'config exists (--force replaces it)' });
    try {
      const { config } = loadConfig(AgentConfigSchema, { file: P(configFile) });
      if (config.stateDir !== stateDir) notes.push(`the kept config has stateDir ${config.stateDir}, but the unit makes only ${stateDir} writable: align them (--state-dir) or the agent cannot write its state`);
    } catch (err) {
      notes.push(`the kept config does not load: ${(err as Error).message}`);
    }
  } else {
    steps.push({ kind: 'mkdir', path: P(dirname(configFile)), mode: 0o755 });
    steps.push({ kind: 'write', path: P(configFile), mode: 0o600, content: renderDefaultConfig({ stateDir, version: o.version }), replaces: haveConfig !== null, what: 'default agent config' });
  }

  const unit = renderUnit({ execPath: paths.exec, committedPath: join(stateDir, 'agent', 'committed', 'fleetlet'), configFile, stateDir, readWritePaths: o.readWritePaths, restartSec: o.restartSec, version: o.version });
  steps.push({ kind: 'mkdir', path: P(unitDir), mode: 0o755 });
  steps.push({ kind: 'write', path: P(paths.unit), mode: 0o644, content: unit, replaces: fs.exists(P(paths.unit)), what: 'systemd unit' });
  return { steps, notes, paths };
}

/** Atomic file write: temp file in the same directory, mode set before the rename. */
function writeAtomic(path: string, data: string | Buffer, mode: number): void {
  const tmp = `${path}.${process.pid}.tmp`;
  try {
    writeFileSync(tmp, data, { mode });
    chmodSync(tmp, mode); // the umask may have narrowed it
    renameSync(tmp, path);
  } catch (err) {
    rmSync(tmp, { force: true });
    throw err;
  }
}

export function executeInstall(plan: InstallPlan): void {
  for (const s of plan.steps) {
    try {
      switch (s.kind) {
        case 'mkdir':
          // parents as a package would have them (0755), the directory itself with its mode
          mkdirSync(dirname(s.path), { recursive: true, mode: 0o755 });
          mkdirSync(s.path, { recursive: true, mode: s.mode });
          break;
        case 'token':
          mkdirSync(dirname(s.path), { recursive: true, mode: 0o700 });
          writeFileSync(s.path, newSecret() + '\n', { mode: 0o600, flag: 'wx' });
          chmodSync(s.path, 0o600);
          break;
        case 'write':
          writeAtomic(s.path, s.content, s.mode);
          break;
        case 'copy': {
          const tmp = `${s.path}.${process.pid}.tmp`;
          copyFileSync(s.from, tmp);
          chmodSync(tmp, s.mode);
          renameSync(tmp, s.path);
          break;
        }
        case 'symlink': {
          mkdirSync(dirname(s.path), { recursive: true });
          // symlink beside, then rename over: the link is never missing
          const tmp = `${s.path}.${process.pid}.tmp`;
          rmSync(tmp, { force: true });
          symlinkSync(s.target, tmp);
          renameSync(tmp, s.path);
          break;
        }
        case 'keep':
          break;
      }
    } catch (err) {
      throw new FleetError('FLEET_INSTALL', `install step ${s.kind} ${s.path} failed: ${(err as Error).message}`, { cause: err });
    }
  }
}

/** One line per step, for the console. */
export function describePlan(plan: InstallPlan, dryRun: boolean): string[] {
  const verb = (now: string, later: string) => (dryRun ? later : now);
  const lines: string[] = [];
  for (const s of plan.steps) {
    if (s.kind === 'mkdir') continue;
    if (s.kind === 'keep') lines.push(`  keep     ${s.path}: ${s.why}`);
    else if (s.kind === 'token') lines.push(`  ${verb('created', 'create ').padEnd(8)} ${s.path} (${s.role} API token, mode 0600)`);
    else if (s.kind === 'write') lines.push(`  ${verb(s.replaces ? 'replaced' : 'wrote', s.replaces ? 'replace' : 'write').padEnd(8)} ${s.path} (${s.what}, mode 0${s.mode.toString(8)})`);
    else if (s.kind === 'copy') lines.push(`  ${verb('copied', 'copy').padEnd(8)} ${s.from} -> ${s.path} (${s.what})`);
    else lines.push(`  ${verb('linked', 'link').padEnd(8)} ${s.path} -> ${s.target} (${s.what})`);
  }
  return lines;
}
