#!/bin/bash
# Run a launcher so that a preempted job ends with exit code 75 (requeue) instead of the elastic
# agent's SignalException traceback and exit 1:
#
#   launch/supervise.sh RUN_DIR torchrun --nproc_per_node 8 train.py hydra.run.dir=RUN_DIR ...
#
# The launcher runs in its own session, so a signal sent to this script's process group (the
# scheduler's TERM, Ctrl-C) does not reach its agent; TERM, USR1, INT and HUP sent to this script are
# forwarded to the agent's children, the ranks, which finish their step, checkpoint and exit. This
# script then exits 75 when RUN_DIR/stopped.json (mhc_lm.run_dir.RunDir.stopped) names a signal as
# the cause, else with the launcher's own status. Used by launch/torchrun.sh and launch/slurm/train.sbatch.
set -uo pipefail

if [ $# -lt 2 ]; then
    echo "error: usage: launch/supervise.sh RUN_DIR LAUNCHER [ARGS...]" >&2
    exit 2
fi
RUN_DIR=$1
shift
EXIT_PREEMPTED=75  # mhc_lm.errors.EXIT_PREEMPTED

AGENT=
PENDING=  # signals that came before the agent's pid was known
forward() {  # to the agent's children: the ranks
    if [ -n "$AGENT" ]; then pkill "-$1" -P "$AGENT" || true; else PENDING="$PENDING $1"; fi
}
for sig in TERM USR1 INT HUP; do
    trap "forward $sig" "$sig"  # set before the launcher starts: an early signal must not end this script
done
# RUN_DIR/continue.sh runs the launcher under this script again (mhc_lm.distributed.SUPERVISOR_ENV).
export MHC_LM_SUPERVISE
MHC_LM_SUPERVISE="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
setsid "$@" &
AGENT=$!
for sig in $PENDING; do  # a signal between the start and `AGENT=$!` is not lost: the ranks get it once they exist
    for _ in $(seq 100); do pgrep -P "$AGENT" >/dev/null && break; sleep 0.1; done
    forward "$sig"
done
status=0
while kill -0 "$AGENT" 2>/dev/null; do  # `wait` returns early when a trapped signal arrives
    status=0
    wait "$AGENT" || status=$?
done
# The record is written after the checkpoint, right before the ranks exit (0 under an elastic agent, 75 on
# their own, which a single-process launcher may turn into its own failure): it decides.
if grep -qs '"cause": "SIG' "$RUN_DIR/stopped.json"; then
    echo "preempted: every rank checkpointed; continue with: bash $RUN_DIR/continue.sh (exit $EXIT_PREEMPTED)" >&2
    exit "$EXIT_PREEMPTED"
fi
exit "$status"
