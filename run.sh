#!/usr/bin/env bash
# The whole pipeline on the bundled defaults, stage by stage. Each script has its own tunables block;
# pass overrides to a stage by running it by hand (python SCRIPT.py --KEY=value).
set -euo pipefail
cd "$(dirname "$0")"
start=$(date +%s)
python data_utils.py --generate   # bundled task -> data/train.jsonl, data/test.jsonl (deterministic)
python data_utils.py              # gold solutions -> data/{train,test}_steps.jsonl
python sft.py                     # tiny policy + judge -> models/ (skipped when up to date)
python evaluate.py                # starting policy -> results/reference/eval_policy
echo "pipeline finished in $(( $(date +%s) - start )) s"
