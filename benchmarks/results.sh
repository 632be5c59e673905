#!/usr/bin/env bash
# The runs behind RESULTS.md, then the report of each sweep (python -m mhc_lm.compare).
#
#   bash benchmarks/results.sh stability   # 48-sublayer model at lr 6e-3: hc, mhc, residual (~15 min on 2 busy cores)
#   bash benchmarks/results.sh table       # every registered variant x 3 seeds, default model/budget (~2 h of CPU)
#
# Environment: VARIANTS (comma list), SEEDS (comma list), STEPS, OUT (default runs/sweeps), KEEP (default
# results/runs: where each run's records are kept, so `python -m mhc_lm.compare results/runs/table` rebuilds
# RESULTS.md's tables without the runs' checkpoints; KEEP= keeps nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/sweeps}
KEEP=${KEEP-results/runs}
export TOKENIZERS_PARALLELISM=false

stability() {
  # A deep, narrow model: 24 blocks = 48 sublayers, d_model 64, a high learning rate; the bundled corpus.
  local variants=${VARIANTS:-hc,mhc,residual} steps=${STEPS:-200}
  nice -n 10 python train.py -m model=tiny model.n_layers=24 optim.lr=6e-3 optim.warmup_steps=20 \
    data.seq_len=64 trainer.batch_size=8 trainer.max_steps="$steps" trainer.eval_every=20 trainer.eval_batches=4 \
    trainer.ckpt_every=0 trainer.keep_last=1 trainer.export=false trainer.num_threads=1 trainer.seed=${SEEDS:-0} \
    logger=none logger.diag_every=20 residual="$variants" hydra.sweep.dir="$OUT/stability"
  python -m mhc_lm.compare "$OUT/stability" ${KEEP:+--keep "$KEEP/stability"}
}

table() {
  # The default model and budget (model=small, 600 steps), every registered variant, 3 seeds.
  local variants=${VARIANTS:-$(ls conf/residual | sed 's/\.yaml$//' | paste -sd, -)}
  nice -n 10 python train.py -m residual="$variants" trainer.seed=${SEEDS:-0,1,2} ${STEPS:+trainer.max_steps=$STEPS} \
    trainer.export=false trainer.num_threads=1 logger=none hydra.sweep.dir="$OUT/table"
  python -m mhc_lm.compare "$OUT/table" ${KEEP:+--keep "$KEEP/table"}
}

case "${1:-}" in
  stability) stability ;;
  table) table ;;
  all) stability; table ;;
  *) echo "usage: bash benchmarks/results.sh stability|table|all" >&2; exit 2 ;;
esac
