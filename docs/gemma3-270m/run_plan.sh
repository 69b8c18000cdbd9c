#!/usr/bin/env bash
# Gemma 3 270M: a LayerBoost plan from the KL-ranked analysis (selection partition), then decode latency and KV bytes
# of that plan against the base, side by side, quiet machine, 2 threads.
set -e
cd /work/snap3
export PYTHONPATH=/work/snap3 LAYERBOOST_DATA_DIR=/work/shared/data HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
D=/work/runs/gemma3
echo "analyze start $(date -u +%H:%M:%S)" >> $D/times.txt
python -m layerboost.cli analyze --model gemma3-270m --limit 10 --softmax 6 --swa 6 --none 6 --window 64 \
    --threads 2 --out $D/analyze > $D/analyze.log 2>&1
echo "analyze end $(date -u +%H:%M:%S)" >> $D/times.txt
python -m layerboost.bench latency --model gemma3-270m --plan $D/analyze/plan.json --threads 2 --batch 16 --prompt 128 \
    --lengths 512,1024,2048,4096 --sample-steps 8 --repeats 3 --out $D/bench_latency > $D/bench.log 2> $D/bench.err
echo "bench end $(date -u +%H:%M:%S)" >> $D/times.txt
