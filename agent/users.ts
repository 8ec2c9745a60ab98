import { readFileSync } from 'node:fs';
import { FleetError } from '../core/errors.ts';

export interface ResolvedUser {
  name: string;
  uid: number;
  gid: number;
  home: string;
}

/**
 * Resolves an app's `user` (a name or a numeric uid) from /etc/passwd. Switching user needs
 * the agent to run as root; an agent running as that same user may name it too.
 */
export function resolveUser(user: string, passwd = '/etc/passwd'): ResolvedUser {
  let found: ResolvedUser | null = null;
  let text = '';
  try {
    text = readFileSync(passwd, 'utf8');
  } catch (err) {
    throw new FleetError('FLEET_APP_USER', `cannot read ${passwd} to resolve user "${user}"`, { cause: err });
  }
  for (const line of text.split('\n')) {
    const f = line.split(':');
    if (f.length < 7) continue;
    if (f[0] === user || (/^\d+$/.test(user) && f[2] === user)) {
      found = { name: f[0]!, uid: Number(f[2]), gid: Number(f[3]), home: f[5]! };
      break;
    }
  }
  if (!found) {
    if (/^\d+$/.test(user)) found = { name: user, uid: Number(user), gid: Number(user), home: '/' };
    else throw new FleetError('FLEET_APP_USER', `no user "${user}" in ${passwd}`);
  }
  const self = process.getuid?.() ?? 0;
  if (self !== 0 && self !== found.uid) throw new FleetError('FLEET_APP_USER', `running apps as "${user}" needs the agent to run as root (it runs as uid ${self})`);
  return found;
}
