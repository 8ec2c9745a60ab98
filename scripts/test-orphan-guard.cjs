// Loaded (--require: Node 20 loads --import modules only in the file's process, not in the
// runner's) into each test file's `node --test` process by scripts/run-tests.mjs.
// That process leads a process group of its own (so a file's timeout kills what it started),
// which also means a kill of the runner's group (a CI job's timeout, a terminal closed) does
// not reach it, and the runner cannot pass on a SIGKILL. So the file's process watches its
// parent: once the runner that started it is gone (the process is re-parented), it kills its
// whole group (pid 0: the caller's group), the file and whatever it started with it.
// Only the runner's direct child watches: the variable is removed before the file's own
// processes start, and they have another parent anyway.
const runner = Number(process.env.FLEETLET_TEST_RUNNER_PID);
delete process.env.FLEETLET_TEST_RUNNER_PID;
if (runner > 0 && process.ppid === runner) {
  setInterval(() => {
    if (process.ppid !== runner) process.kill(0, 'SIGKILL');
  }, 1000).unref();
}
