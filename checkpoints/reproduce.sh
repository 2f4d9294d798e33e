#!/usr/bin/env bash
# Reproduce the default checkpoints (checkpoints/prf_model_a.pt, prf_model_b.pt) and thresholds.yaml with
# the project's own commands, on the built-in defaults (built-in quadruped, render backend). CPU only.
#
#   bash checkpoints/reproduce.sh [WORK_DIR]        (default WORK_DIR: runs/defaults)
#
# Seeds: training data 100 (synthetic) and 110 (stand-in "real" set); held-out evaluation 200 / 201;
# threshold calibration 300. Benchmarks use seeds from 10000 up, disjoint from all of these.
# On the 2-core machine this takes about 75 minutes in all, 62 of them training (checkpoints/MANIFEST has
# the measured times);
# each step's wall time is printed as it ends and appended to WORK_DIR/times.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-runs/defaults}
mkdir -p "$work"

# step NAME CMD...: run a command and print its wall time (the figures in checkpoints/MANIFEST)
step() {
  local name=$1 started=$SECONDS
  shift
  "$@"
  echo "[reproduce] $name: $((SECONDS - started)) s" | tee -a "$work/times.txt"
}

# 1. data: faithful synthetic renders for model A and B's pretraining; a visibly different stand-in
#    "real" set (Animal3D-format JSON) for B's fine-tuning; held-out and calibration batches.
step "data: synthetic" prf generate "$work/synthetic" --n 5000 --seed 100 --image-size 128
step "data: standin" prf generate "$work/standin" --n 1500 --seed 110 --image-size 128 --style standin \
  --focal-px 1000 --animal3d-json "$work/standin/train.json"
step "data: heldout_faithful" prf generate "$work/heldout_faithful" --n 300 --seed 200 --image-size 128
step "data: heldout_faithful2" prf generate "$work/heldout_faithful2" --n 300 --seed 202 --image-size 128
step "data: heldout_failures" prf generate "$work/heldout_failures" --n 300 --seed 201 --image-size 128 \
  --inject-failures 1.0
step "data: calibration" prf generate "$work/calibration" --n 1200 --seed 300 --image-size 128 \
  --inject-failures 0.5
# validation: where the metric set of step 4 was chosen (checkpoints/MANIFEST); step 4 reports on it
step "data: validation" prf generate "$work/validation" --n 1200 --seed 301 --image-size 128 \
  --inject-failures 0.5

# 2. model A (synthetic only) and model B (pretrain on synthetic, then finetune on the stand-in set);
#    the packaged configs prf/configs/train_default_*.yaml hold every setting.
step "train: model A" prf train --stage synthetic --data "$work/synthetic" --run-dir "$work/model_a_8k"
# ... then 3000 more steps from that export, a second cosine cycle at a quarter of the learning rate
#     (checkpoints/MANIFEST: validation Matthews correlation 0.403 -> 0.427)
step "train: model A continued" prf train --stage synthetic --data "$work/synthetic" \
  --init "$work/model_a_8k/export.pt" --run-dir "$work/model_a" --max-steps 3000 --set optim.lr=0.0005
step "train: model B pretrain" prf train --stage pretrain --data "$work/synthetic" \
  --run-dir "$work/model_b_pretrain"
step "train: model B finetune" prf train --stage finetune --data "$work/standin/train.json" \
  --init "$work/model_b_pretrain/export.pt" --run-dir "$work/model_b"
for model in a b; do
  run="$work/model_$model"
  cp "$run/export.pt" "checkpoints/prf_model_$model.pt"
  cp "$run/export.pt.sha256" "checkpoints/prf_model_$model.pt.sha256"  # checked on every load
done

# 3. held-out metrics (faithful images of a new seed, and images with injected failures)
for model in a b; do
  prf evaluate "checkpoints/prf_model_$model.pt" "$work/heldout_faithful" --rows faithful --json \
    > "$work/eval_${model}_faithful.json"
  prf evaluate "checkpoints/prf_model_$model.pt" "$work/heldout_failures" --rows failures --json \
    > "$work/eval_${model}_failures.json"
done
prf evaluate checkpoints/prf_model_a.pt "$work/heldout_faithful2" --rows faithful --json > "$work/eval_a_faithful2.json"
prf evaluate checkpoints/prf_model_a.pt "$work/heldout_faithful" --rows faithful --no-flip-test --json \
  > "$work/eval_a_faithful_noflip.json"

# 4. thresholds for the default checkpoints: score the calibration batch, pick the thresholds with the best
#    Matthews correlation (on a batch that is half failures, best F1 prefers rejecting most faithful images)
#    over the metrics that carried over best to the validation batch (checkpoints/MANIFEST)
step "score: calibration" prf score "$work/calibration" --thresholds examples/thresholds-paper.yaml \
  --models checkpoints/prf_model_a.pt --models checkpoints/prf_model_b.pt --out "$work/calibration_scores/scores.parquet"
# the validation batch, scored the same way, only to report how the chosen thresholds carry over
step "score: validation" prf score "$work/validation" --thresholds examples/thresholds-paper.yaml \
  --models checkpoints/prf_model_a.pt --models checkpoints/prf_model_b.pt --out "$work/validation_scores/scores.parquet"
prf calibrate "$work/calibration_scores/scores.parquet" --labels "$work/calibration" --out thresholds.yaml --force \
  --objective mcc --metric pa_mpjpe --metric s_mpjpe --metric pck --metric max_rel_kp_error \
  --plot "$work/calibration_roc.png" \
  --check-scores "$work/validation_scores/scores.parquet" --check-labels "$work/validation"
# (calibrate names each model's checkpoint in the file, relative to it: checkpoints/prf_model_a.pt, ...)
