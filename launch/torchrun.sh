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

# launch/supervise.sh runs torchrun in its own session and forwards signals to the ranks only: a
# preempted job exits 75 (requeue) with one line, not with torch-elastic's traceback and exit 1.
exec "$(dirname "$0")/supervise.sh" "$RUN_DIR" \
    torchrun "${RDZV[@]}" --nproc_per_node "$NPROC_PER_NODE" train.py "hydra.run.dir=$RUN_DIR" "$@"
