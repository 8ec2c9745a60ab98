/**
 * The launch shim: every app starts as `/bin/sh -c SHIM_SCRIPT fleetlet-shim <opts> -- <command> <args…>`
 * in a new process group whose leader is the shim itself (spawned detached), then `exec`s
 * the app, so the app keeps the shim's pid and is its group's leader.
 *
 * Why a shim: Linux gives an unprivileged Node process no parent-death signal, and an app in
 * its own process group survives a SIGKILLed agent. Before the exec the shim forks a small
 * watcher (a subshell, a few hundred KiB) that holds the read end of a pipe from the agent. The
 * pipe reaches EOF when the agent dies, however it dies, or when the agent closes it after
 * the app exited; the watcher then sends SIGTERM to the whole group, waits the app's grace
 * period and sends SIGKILL. So an app and everything it started never outlive the agent.
 *
 * Before the exec the shim also:
 *   - waits for one line on stdin ("go"): the agent uses that moment to move the shim's pid
 *     into the app's cgroup, so the app never runs a cycle outside its limits;
 *   - applies the fallbacks for limits when no cgroup is available: RLIMIT_DATA (`ulimit -d`)
 *     for memory and `nice` for CPU priority.
 * The app's stdin is /dev/null; only the watcher keeps the pipe, and the watcher's own output
 * goes to /dev/null (it must neither print into the app's log nor hold its output pipes open).
 *
 * The script is plain POSIX sh (dash on Debian/Raspberry Pi OS, busybox ash works too).
 */
export const SHIM_SCRIPT = `
grace=1; datakb=; nice=
while [ $# -gt 0 ]; do
  case "$1" in
    --grace) grace=$2; shift 2;;
    --data-kb) datakb=$2; shift 2;;
    --nice) nice=$2; shift 2;;
    --) shift; break;;
    *) echo "fleetlet-shim: bad option $1" >&2; exit 127;;
  esac
done
IFS= read -r go || exit 0
[ "$go" = go ] || exit 0
agent=$PPID
(
  trap ':' TERM INT HUP
  while :; do
    if read -r _; then continue; fi
    # EOF (agent gone, or the app exited and the agent closed the pipe) or a trapped signal
    # (/proc, not kill -0: an app running as another user may not signal the agent)
    if [ -d "/proc/$agent" ] && kill -0 $$ 2>/dev/null; then sleep 0.2; continue; fi
    break
  done
  kill -TERM 0 2>/dev/null
  sleep "$grace"
  kill -KILL 0 2>/dev/null
) >/dev/null 2>&1 &
if [ -n "$datakb" ]; then ulimit -d "$datakb" || { echo "fleetlet-shim: cannot set the memory limit (ulimit -d $datakb)" >&2; exit 126; }; fi
if [ -n "$nice" ]; then exec nice -n "$nice" "$@" </dev/null; fi
exec "$@" </dev/null
`;

export interface ShimOptions {
  /** seconds between the watcher's SIGTERM and SIGKILL */
  graceS: number;
  /** RLIMIT_DATA in KiB (fallback memory limit) */
  dataKb?: number;
  /** nice increment (CPU priority fallback) */
  nice?: number;
}

/** argv for `spawn('/bin/sh', shimArgv(...))` */
export function shimArgv(opts: ShimOptions, command: string, args: readonly string[]): string[] {
  const argv = ['-c', SHIM_SCRIPT, 'fleetlet-shim', '--grace', String(Math.max(1, Math.ceil(opts.graceS)))];
  if (opts.dataKb !== undefined) argv.push('--data-kb', String(Math.max(1, Math.floor(opts.dataKb))));
  if (opts.nice !== undefined) argv.push('--nice', String(Math.trunc(opts.nice)));
  argv.push('--', command, ...args);
  return argv;
}
