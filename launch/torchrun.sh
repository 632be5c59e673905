#!/bin/bash
# torchrun on one node or several (run it on every node), for clusters without SLURM.
#
#   launch/torchrun.sh model=base residual=mhc                          # all GPUs of this machine
#   NPROC_PER_NODE=2 launch/torchrun.sh experiment=smoke                # two processes (CPU: gloo)
#   NNODES=4 MASTER_ADDR=node0 RUN_DIR=runs/big launch/torchrun.sh model=medium    # on each of 4 nodes
#
# The run directory must be the same on every rank (and every node): pass RUN_DIR or it is
# fixed here once, on this node, from the date.
set -euo pipefail

NNODES=${NNODES:-1}
if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
RUN_DIR=${RUN_DIR:-runs/torchrun-$(date +%Y%m%d-%H%M%S)}
export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-240}

if [ "$NNODES" -gt 1 ]; then
    for var in MASTER_ADDR RUN_DIR; do
        if [ -z "${!var:-}" ]; then
            echo "error: environment $var=<unset>: NNODES=$NNODES needs it on every node" >&2
            exit 2
        fi
    done
    RDZV=(--nnodes "$NNODES" --rdzv_backend c10d
          --rdzv_endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv_id "$(basename "$RUN_DIR")")
else
    RDZV=(--standalone)
fi

# torchrun runs in its own session: a signal to this script (the scheduler's TERM, Ctrl-C, USR1) goes to
# the ranks through the traps below and not to torchrun's agent, which would end with a SignalException
# traceback and exit 1. The ranks checkpoint and exit 0; this script then exits 75 (preempted: requeue)
# when RUN_DIR/stopped.json names a signal (mhc_lm.distributed.STOPPED_FILE), else with torchrun's status.
setsid torchrun "${RDZV[@]}" --nproc_per_node "$NPROC_PER_NODE" train.py "hydra.run.dir=$RUN_DIR" "$@" &
AGENT=$!
for sig in TERM USR1 INT HUP; do
    trap "pkill -$sig -P $AGENT || true" "$sig"  # the agent's children: the ranks
done
status=0
while kill -0 "$AGENT" 2>/dev/null; do  # `wait` returns early when a trapped signal arrives
    status=0
    wait "$AGENT" || status=$?
done
if [ "$status" -eq 0 ] && grep -qs '"cause": "SIG' "$RUN_DIR/stopped.json"; then
    echo "preempted: every rank checkpointed; continue with: bash $RUN_DIR/continue.sh (exit 75)" >&2
    exit 75
fi
exit "$status"
