#!/usr/bin/env bash
# Gemma 3 270M base scores, full splits (MMLU: 20 items per subject, seeded), one task at a time; finished tasks are skipped.
cd /work/snap
export PYTHONPATH=/work/snap LAYERBOOST_DATA_DIR=/work/shared/data HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
for t in winogrande arc_challenge arc_easy piqa mmlu; do
  out=/work/runs/gemma3/base_$t.json
  [ -f "$out" ] && continue
  extra=""; [ "$t" = mmlu ] && extra="--mmlu-per-subject 20"
  start=$(date -u +%H:%M:%S)
  python -m layerboost.cli eval --model gemma3-270m --tasks $t --per-item --no-progress $extra --out $out.tmp && mv $out.tmp $out
  echo "$t $start $(date -u +%H:%M:%S)" >> /work/runs/gemma3/times.txt
done
