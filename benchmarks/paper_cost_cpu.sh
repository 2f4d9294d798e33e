#!/usr/bin/env bash
# KCF's cost per image against PRF's at the paper's settings on THIS machine's CPU (issue 7's cost target
# on the 2-core machine), the CPU counterpart of gpu_checks.sh's KCF and paper_cost steps:
#
#     bash benchmarks/paper_cost_cpu.sh WORK [IMAGES]          (11 minutes on the 2-core machine)
#
# 1. a BATCH of IMAGES (default 160) 128 px renders, run seed 10 000 (filter_quality's seed-0 batch seed),
#    half with injected failures;
# 2. `prf kcf` with kcf/configs/kcf_paper.yaml (ResNet-50 at 256 px, SGD, 32-true) on 2 folds for 1 and for
#    2 epochs: their difference is the marginal cost of an image-epoch (benchmarks/paper_cost.py, which
#    reads each run's cost from its SCORES file and keeps both in its result);
# 3. PRF's cost per image on the same batch with the default checkpoints (score_throughput.py, both CPU
#    layouts) and with paper-size nets (a 2-step export of train_paper_synthetic.yaml run on the CPU: the
#    speed of hrnet_w32 at 224 px does not depend on its weights; one-process layout only, about 1.5
#    images/s here);
# 4. paper_cost.py for each PRF: KCF at 5 folds x 150 epochs against PRF, as
#    WORK/paper_cost_cpu_{default_checkpoints,paper_size}.json.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:?usage: paper_cost_cpu.sh WORK [IMAGES]}
IMAGES=${2:-160}
mkdir -p "$WORK"
export HF_HUB_OFFLINE=1
B=$WORK/batch

prf generate "$B" --n "$IMAGES" --seed 10000 --image-size 128 --inject-failures 0.5
for epochs in 1 2; do
  prf kcf "$B" --config kcf/configs/kcf_paper.yaml --folds 2 --epochs "$epochs" --quiet \
    --set data.num_workers=0 --out "$WORK/kcf_$epochs/scores.parquet"
done

prf train --data "$B" --stage synthetic --config prf/configs/train_paper_synthetic.yaml --max-steps 2 \
  --run-dir "$WORK/paper_synthetic" --set trainer.accelerator=cpu --set trainer.devices=1 \
  --set trainer.strategy=auto --set trainer.precision=32-true --set data.num_workers=0 --set batch_size=8
paper=$WORK/paper_synthetic/export.pt
python3 benchmarks/score_throughput.py "$B" --batch-size 32 --repeats 1 --out "$WORK/score_throughput_cpu.json"
python3 benchmarks/score_throughput.py "$B" --batch-size 32 --repeats 1 --processes 1 \
  --models "$paper" "$paper" --out "$WORK/score_throughput_cpu_paper_size.json"

# paper_cost.py reads the first layout, one process (the CPU default, two, is faster: a cautious figure)
for prf_run in cpu:default_checkpoints cpu_paper_size:paper_size; do
  python3 benchmarks/paper_cost.py --kcf "$WORK/kcf_1/scores.parquet:1" \
    --kcf "$WORK/kcf_2/scores.parquet:2" --prf "$WORK/score_throughput_${prf_run%%:*}.json" \
    --out "$WORK/paper_cost_cpu_${prf_run##*:}.json"
done
