#!/usr/bin/env bash
# The life of one test-bed node, started by the harness (e2e/src/cluster.rs) with a pipe
# from the test process as standard input:
#   1. takes the node lock, waiting while another node (another test binary, the demo)
#      still runs or is being removed;
#   2. cleans up whatever an earlier, possibly killed, run left (cleanup.sh --start);
#   3. says "ready" on standard output: the harness starts the node;
#   4. waits until the pipe closes: the harness dropped the cluster, or the test process
#      exited or was killed (the kernel closes the pipe then);
#   5. stops and removes everything and restores the kernel settings (cleanup.sh --stop),
#      still holding the lock, so the next node starts on a clean machine.
# Ctrl-C reaches the whole process group; this script outlives it to clean up.
trap '' INT TERM HUP
here=$(cd "$(dirname "$0")" && pwd)
lock=${CLOUDPASS_NODE_RUN_DIR:-/run/cloudpass-node}.lock
exec 9>"$lock"
if ! flock -n 9; then
  echo "watchdog: another test-bed node holds $lock; waiting for it to stop" >&2
  flock 9
fi
"$here/cleanup.sh" --start
echo ready
cat >/dev/null
"$here/cleanup.sh" --stop
