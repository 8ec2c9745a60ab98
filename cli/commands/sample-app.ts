import { createServer } from 'node:http';
import { defineCommand, EXIT, intFlag } from '../command.ts';

/**
 * A tiny app for the demo and tests, so supervision can be shown without any runtime
 * on the device: an HTTP /health endpoint, a log line every few seconds, and an orphan
 * guard (it exits when its parent, the agent, is gone).
 */
export const sampleAppCommand = defineCommand({
  name: 'sample-app',
  summary: 'a small HTTP app to supervise (demo and tests)',
  usage: '[--port N] [--exit-after-ms N] [--exit-code N]',
  hidden: true,
  options: {
    port: { type: 'string', default: '0' },
    'exit-after-ms': { type: 'string' },
    'exit-code': { type: 'string', default: '1' },
    'log-every-ms': { type: 'string', default: '5000' },
  },
  help: {
    port: 'HTTP port on 127.0.0.1 (0 = any)',
    'exit-after-ms': 'exit after this long (to simulate a crash)',
    'exit-code': 'exit code used with --exit-after-ms',
    'log-every-ms': 'period of the heartbeat log line',
  },
  async run({ values }) {
    const port = intFlag(values, 'port', 0, 65535) ?? 0;
    const exitAfter = intFlag(values, 'exit-after-ms', 0);
    const exitCode = intFlag(values, 'exit-code', 0, 255) ?? 1;
    const every = intFlag(values, 'log-every-ms', 10) ?? 5000;
    let requests = 0;
    const server = createServer((req, res) => {
      requests++;
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ status: 'ok', requests, path: req.url }));
    });
    await new Promise<void>((r) => server.listen(port, '127.0.0.1', r));
    const addr = server.address();
    process.stdout.write(`sample-app pid ${process.pid} listening on 127.0.0.1:${typeof addr === 'object' && addr ? addr.port : port}\n`);
    const parent = process.ppid;
    return new Promise<number>((resolve) => {
      const done = (code: number) => {
        clearInterval(beat);
        clearInterval(guard);
        server.close();
        resolve(code);
      };
      const beat = setInterval(() => process.stdout.write(`sample-app heartbeat requests=${requests}\n`), every);
      // orphaned (re-parented): our supervisor died, so leave rather than run unsupervised
      const guard = setInterval(() => process.ppid !== parent && done(EXIT.OK), 500);
      if (exitAfter !== undefined) setTimeout(() => {
        process.stderr.write(`sample-app exiting with code ${exitCode} as asked\n`);
        done(exitCode);
      }, exitAfter);
      process.once('SIGTERM', () => done(EXIT.OK));
      process.once('SIGINT', () => done(EXIT.OK));
    });
  },
});
