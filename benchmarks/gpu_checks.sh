#!/usr/bin/env bash
# The checks that need a GPU, in one script (run it on a CUDA machine; results go to OUT):
#
#     bash benchmarks/gpu_checks.sh OUT [IMAGES] [DECODE_WORKERS] [GPU_PROCESSES]
#
# 1. generate: a BATCH of IMAGES (default 3000) 128 px PNG renders, 30% with injected failures (run seed
#    40 100, disjoint from every training and benchmark batch), one render process per spare core.
# 2. throughput: benchmarks/score_throughput.py --device cuda on it with the default checkpoints (#5's ratio
#    end to end / raw forward on the GPU), batch 256, DECODE_WORKERS (default: cores - 2) decode workers.
#    Then where a batch's time goes (benchmarks/score_profile.py, OUT/score_profile_cuda.txt), and the
#    throughput at batch 1024, and of GPU_PROCESSES (default: cores / 2, at most 8) scoring processes
#    sharing the GPU, each decoding inline (`prf score --device cuda --processes P`, batch 256; both
#    printed to the log only: at most 8 files come back from a device run).
# 3. agreement: the first 500 images scored on the GPU (AMP float16 nets) and on the CPU (float32): how
#    many verdicts and how far the metrics differ.
# 4. memory: peak RSS and peak GPU memory of `prf score --device cuda` on 1000 vs all IMAGES, batch 16 so
#    that both runs score more images than the DataLoader holds in flight (where RSS should level off).
# 5. paper-size PRF: `prf train` with prf/configs/train_paper_synthetic.yaml as written (hrnet_w32, 224 px,
#    batch 64, 16-mixed, DDP on every GPU) for 60 steps from random weights -- a check that the paper
#    config trains on a GPU and its speed, not a trained model -- then the throughput benchmark with that
#    export as both models (paper-size scoring cost per image).
# 6. paper-size KCF: `prf kcf` with kcf/configs/kcf_paper.yaml (ResNet-50, 256 px, SGD, 32-true) for 1
#    and for 3 epochs on 2 folds: the difference is the marginal cost of an epoch (Lightning's start-up
#    and the scoring cancel); benchmarks/paper_cost.py extends it to the paper's 5 folds x 150 epochs and
#    divides by step 5's PRF cost per image.
#
# Each step runs on its own (one failing does not stop the others) and appends to OUT/log.txt; its
# result files land in OUT. Runs in about 7 minutes on one H200 with 16 cores (4 min 52 s before the
# profile, batch-1024 and GPU-processes steps were added; the 7 is an estimate, not yet measured).
set -u
OUT=${1:?usage: gpu_checks.sh OUT [IMAGES] [DECODE_WORKERS] [GPU_PROCESSES]}
IMAGES=${2:-3000}
CORES=$(nproc)
WORKERS=${3:-$((CORES > 4 ? CORES - 2 : 2))}
GPU_PROCESSES=${4:-$((CORES / 2 > 8 ? 8 : (CORES / 2 > 2 ? CORES / 2 : 2)))}
WORK=${WORK:-/tmp/prf-gpu-checks}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
prf() { python3 -m prf "$@"; }
export -f prf  # the steps below run their shell functions in `timeout bash -c`
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/log.txt"; }
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log its output and how it ended
    local name=$1 limit=$2 started=$SECONDS
    shift 2
    log "== $name"
    timeout "$limit" bash -c '"$@"' _ "$@" 2>&1 | tee -a "$OUT/log.txt"
    log "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - started)) s"
}

log "machine: $CORES cores; $(nvidia-smi -L 2>/dev/null | head -1)"
python3 -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__,
    "cuda", torch.cuda.is_available())' | tee -a "$OUT/log.txt"

B=$WORK/batch
export B WORK OUT IMAGES WORKERS CORES
step generate 150 prf generate "$B" --n "$IMAGES" --seed 40100 --image-size 128 --inject-failures 0.3 \
    --devices $((CORES > 2 ? CORES - 2 : 1)) --workers 1

step throughput 150 python3 benchmarks/score_throughput.py "$B" --device cuda --workers "$WORKERS" \
    --batch-size 256 --repeats 2 --out "$OUT/score_throughput_cuda.json"

agreement() {  # the GPU run uses prf score's own defaults (batch size, decode workers): its time is in the log
    local started=$SECONDS
    prf score "$B" --thresholds thresholds.yaml --limit 500 --device cuda --quiet \
        --out "$WORK/agree_gpu/scores.parquet" &&
        echo "prf score --device cuda with its defaults: 500 images in $((SECONDS - started)) s" &&
        prf score "$B" --thresholds thresholds.yaml --limit 500 --device cpu \
            --processes $((CORES > 2 ? CORES - 2 : 1)) --quiet --out "$WORK/agree_cpu/scores.parquet" &&
        python3 - "$WORK" "$OUT/agreement.json" <<'EOF'
import json, sys
import numpy as np, pandas as pd
work, out = sys.argv[1:]
gpu = pd.read_parquet(f"{work}/agree_gpu/scores.parquet").set_index("image_id").sort_index()
cpu = pd.read_parquet(f"{work}/agree_cpu/scores.parquet").set_index("image_id").sort_index()
result = {"images": len(gpu), "same_images": bool(gpu.index.equals(cpu.index))}
for column in [c for c in gpu.columns if c.endswith("keep")]:
    result[f"{column}_agree"] = float((gpu[column] == cpu[column]).mean())
for column in [c for c in gpu.columns if c.endswith(("_pa_mpjpe", "_s_mpjpe", "_pck", "_max_kp_error", "_max_rel_kp_error"))]:
    diff = (gpu[column].astype(float) - cpu[column].astype(float)).abs()
    result[f"{column}_abs_diff_median"] = float(np.nanmedian(diff))
    result[f"{column}_abs_diff_max"] = float(np.nanmax(diff))
print(json.dumps(result, indent=1))
json.dump(result, open(out, "w"), indent=1)
EOF
}
step profile 90 python3 benchmarks/score_profile.py "$B" --device cuda --workers "$WORKERS" --batch-size 256 \
    --out "$OUT/score_profile_cuda.txt"
step throughput_1024 120 python3 benchmarks/score_throughput.py "$B" --device cuda --workers "$WORKERS" \
    --batch-size 1024 --repeats 1 --out "$WORK/score_throughput_cuda_1024.json"
step gpu_processes 180 python3 benchmarks/score_throughput.py "$B" --device cuda --workers "$WORKERS" \
    --processes "$GPU_PROCESSES" --batch-size 256 --repeats 1 --out "$WORK/score_throughput_cuda_processes.json"

export -f agreement
step agreement 90 agreement

peak_memory() {  # peak RSS (this process, largest child) and peak GPU memory of one `prf score` call
    python3 - "$@" <<'EOF'
import json, resource, sys
import torch
from prf.cli import app
try:
    app(sys.argv[1:], prog_name="prf")
except SystemExit as stop:
    if stop.code not in (0, None):
        raise
print(json.dumps({"rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "children_rss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                  "cuda_peak_bytes": torch.cuda.max_memory_allocated()}))
EOF
}
memory() {  # batch 16: at most 14 workers x 4 x 16 = 896 images in flight, fewer than either run scores
    for n in 1000 "$IMAGES"; do
        echo "images $n:"
        peak_memory score "$B" --thresholds thresholds.yaml --limit "$n" --device cuda --workers "$WORKERS" \
            --batch-size 16 --quiet --out "$WORK/memory_$n/scores.parquet" | tail -1
    done
}
export -f peak_memory memory
step memory 90 memory

step paper_train 150 prf train --data "$B" --stage synthetic --config prf/configs/train_paper_synthetic.yaml \
    --max-steps 60 --run-dir "$WORK/paper_synthetic" --set data.num_workers="$WORKERS"
if [ -f "$WORK/paper_synthetic/export.pt" ]; then
    step paper_throughput 120 python3 benchmarks/score_throughput.py "$B" --device cuda --workers "$WORKERS" \
        --batch-size 256 --repeats 1 --models "$WORK/paper_synthetic/export.pt" \
        "$WORK/paper_synthetic/export.pt" --out "$OUT/score_throughput_cuda_paper_size.json"
fi

kcf_cost() {
    for epochs in 1 3; do
        prf kcf "$B" --config kcf/configs/kcf_paper.yaml --folds 2 --epochs "$epochs" --quiet \
            --set data.num_workers="$WORKERS" --out "$WORK/kcf_$epochs/scores.parquet" || return 1
    done
}
export -f kcf_cost
step kcf_paper 180 kcf_cost
# paper_cost.py reads each KCF run's cost from its SCORES file and keeps both in OUT/paper_cost.json
step paper_cost 30 python3 benchmarks/paper_cost.py --kcf "$WORK/kcf_1/scores.parquet:1" \
    --kcf "$WORK/kcf_3/scores.parquet:3" --prf "$OUT/score_throughput_cuda_paper_size.json" \
    --out "$OUT/paper_cost.json"
log "done"
