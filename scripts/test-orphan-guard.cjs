// Loaded (--require: Node 20 loads --import modules only in the file's process, not in the
// runner's) into each test file's `node --test` process by scripts/run-tests.mjs.
// That process leads a process group of its own (so a file's timeout kills what it started),
// which also means a kill of the runner's group (a CI job's timeout, a terminal closed) does
// not reach it, and the runner cannot pass on a SIGKILL. So the file's process watches its
// parent: once the runner that started it is gone (the process is re-parented), it kills its
// whole group (pid 0: the caller's group), the file and whatever it started with it.
// Only the runner's direct child watches: run-tests.mjs sets the variable for it alone, and
// it is removed here before the file's own processes start. Checked once a second, at load
// (the runner may be gone already), at exit, and when a write to stdout or stderr fails: a
// runner killed while the file prints output breaks those pipes, and the EPIPE would end
// this process (with no 'exit' event, as measured on Node 20.20.2) before its next check,
// leaving the file's quiet processes behind.
const runner = Number(process.env.FLEETLET_TEST_RUNNER_PID);
delete process.env.FLEETLET_TEST_RUNNER_PID;
if (runner > 0) {
  const check = () => {
    if (process.ppid !== runner) process.kill(0, 'SIGKILL');
  };
  check();
  setInterval(check, 1000).unref();
  process.on('exit', check);
  for (const stream of [process.stdout, process.stderr]) stream.on('error', check);
}
