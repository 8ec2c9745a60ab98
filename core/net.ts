import { createSocket } from 'node:dgram';
import { createServer } from 'node:net';

/** true when `port` can be bound on `host` right now (TCP or UDP). Racy by nature: for picking defaults only. */
export function portFree(host: string, port: number, proto: 'tcp' | 'udp'): Promise<boolean> {
  return new Promise((resolve) => {
    if (proto === 'tcp') {
      const s = createServer();
      s.once('error', () => resolve(false));
      s.listen(port, host, () => s.close(() => resolve(true)));
    } else {
      const s = createSocket(host.includes(':') ? 'udp6' : 'udp4');
      s.once('error', () => {
        s.close();
        resolve(false);
      });
      s.bind(port, host, () => s.close(() => resolve(true)));
    }
  });
}

/** The preferred port when free, else 0 (any free port). */
export async function preferPort(host: string, port: number, proto: 'tcp' | 'udp'): Promise<number> {
  return port !== 0 && (await portFree(host, port, proto)) ? port : 0;
}

/** true for addresses only this machine can reach (127.0.0.0/8, ::1, localhost): where reads may go without a token. */
export function isLoopback(host: string): boolean {
  // an IPv4 literal in 127.0.0.0/8, not any name that starts with "127."
  return host === 'localhost' || host === '::1' || /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(host);
}
