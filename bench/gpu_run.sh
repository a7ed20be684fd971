#!/usr/bin/env bash
# On a lent GPU machine, from the repository root (the device tool's `run`); issue 31, item 5.
#
#   bench/gpu_run.sh receive N   # a call carrying .gpu-carry/part-N: keeps it for the next call
#   bench/gpu_run.sh check       # installs the carried wheels, imports everything, 1 minute
#   bench/gpu_run.sh bench       # the measurements, into $OUT
#
# A warm machine keeps ignored files between calls, so the pieces add up in .gpu-stage/ as
# long as each call follows the last within the machine's idle release. `bench` measures, in
# one run each: the screening bench with production-size models (ViT-L/14, 448 px tiles,
# bf16 autocast on CUDA) fused and split, the sequential baseline and the forward alone
# (bench/screening.py --sizes prod), a scorer's start at those sizes (bench/scorer_start.py),
# then the production pretraining step (batched crops,
# this commit) and the step before batched crops (commit fc35826, carried as .gpu-old/ by
# `git archive`, see docs/benchmarks.md), alternated.
set -euo pipefail
export PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT" .gpu-stage

install() {
  [ -d /tmp/site/ray ] && return 0
  cat .gpu-stage/wheels.tar.* | tar -C .gpu-stage -xf -
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu-stage/wheels/*.whl
}

case "${1:-}" in
receive)
  cp ".gpu-carry/part-$2"/* .gpu-stage/ && ls -la .gpu-stage
  ;;
check)
  install
  export PYTHONPATH=/tmp/site:platform
  python3 -c "import ray, ray.data, ray.train, pydantic, openslide, timm, torch
import smartccs.engine.screen, smartccs.train.pretrain
print('ray', ray.__version__, 'torch', torch.__version__, 'timm', timm.__version__,
      'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0))"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.csv"
  ;;
bench)
  install
  export PYTHONPATH=/tmp/site:platform
  cores=$(nproc)
  # one scorer per 4 cores sharing the GPU, as jobs/configs/screen-prod.yaml places them
  python3 bench/screening.py --sizes prod --cpus 4 --no-pin --side-px 12000 --repeats 3 \
    --tag gpu-prod 2>&1 | tee "$OUT/screening.log"
  cp bench/out/screening-gpu-prod.json "$OUT/"
  # a scorer's constructor at production sizes (weights read, meta build, moved to the GPU)
  python3 bench/scorer_start.py --sizes prod --threads 4 --tag gpu-prod 2>&1 | tee "$OUT/scorer_start.log"
  cp bench/out/scorer_start-gpu-prod.json "$OUT/"
  for round in 1 2; do
    python3 bench/pretrain_throughput.py --device cuda --threads "$cores" --steps 5 \
      --repeats 3 --config jobs/configs/pretrain-prod.yaml 2>&1 | tee "$OUT/pretrain-new-$round.log"
    (cd .gpu-old && PYTHONPATH=/tmp/site:platform python3 bench/pretrain_throughput.py \
      --device cuda --threads "$cores" --steps 5 --repeats 3 \
      --config jobs/configs/pretrain-prod.yaml 2>&1 | tee "$OUT/pretrain-old-$round.log")
  done
  ;;
*)
  echo "usage: bench/gpu_run.sh receive N | check | bench" >&2
  exit 2
  ;;
esac
