#!/usr/bin/env bash
# Independent-simulator benchmark: simulate a dataset with benchmarks/independent/simulate.py
# (written without diffim's simulator), run the diffim workflow on it, score it.
#   bash benchmarks/independent/run.sh [--preset small|wide|lsst|<a variant: see simulate.py>] [--seed N] [--work DIR] [--cores N]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PRESET=small SEED=1 CORES=2 WORK=""
while [ $# -gt 0 ]; do
  case "$1" in
    --preset) PRESET="$2"; shift 2 ;;
    --seed) SEED="$2"; shift 2 ;;
    --work) WORK="$2"; shift 2 ;;
    --cores) CORES="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
WORK="${WORK:-$HERE/work/${PRESET}_${SEED}}"
PY="${PYTHON:-$(command -v python3)}"
SNAKEMAKE="${SNAKEMAKE:-$(dirname "$PY")/snakemake}"
[ -x "$SNAKEMAKE" ] || SNAKEMAKE="$(command -v snakemake)"
mkdir -p "$WORK"
if [ ! -f "$WORK/data/refcat.csv" ]; then
  "$PY" "$HERE/simulate.py" --outdir "$WORK/data" --seed "$SEED" --preset "$PRESET"
fi
cd "$WORK"
start=$(date +%s)
"$SNAKEMAKE" --snakefile "$REPO/Snakefile" --cores "$CORES" \
  --config "images=$WORK/data/images/*.fits" "refcat=$WORK/data/refcat.csv" "outdir=$WORK/results" \
  > "$WORK/snakemake.log" 2>&1
echo "workflow: $(( $(date +%s) - start )) s on $CORES cores (log: $WORK/snakemake.log)"
"$PY" "$HERE/score.py" --data "$WORK/data" --results "$WORK/results" --json "$WORK/score.json" \
  | tee "$WORK/score.txt"
