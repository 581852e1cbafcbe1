#!/usr/bin/env bash
# Reproduce every table of bench/README.md: install the peers (pinned, torch untouched), then one command per table.
#   bash bench/run_all.sh                      # full protocol (about 1-2 h on 2 quiet cores)
#   bash bench/run_all.sh --max-tokens 8192    # any flag is passed to both scripts (see --help)
# Set THREADS to change torch threads (default 2, as in the published tables), BENCH_MACHINE to name the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
make venv >/dev/null
.venv/bin/pip install -q -c constraints.txt -r bench/requirements-peers.txt
.venv/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export LMSHRINK_DATA="${LMSHRINK_DATA:-$(cd .. && pwd)/shared/data}"
THREADS="${THREADS:-2}"
.venv/bin/python bench/peers_quant.py --threads "$THREADS" "$@"
.venv/bin/python bench/peers_prune.py --threads "$THREADS" "$@"
