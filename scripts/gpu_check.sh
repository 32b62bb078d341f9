#!/usr/bin/env bash
# What to run first on a new GPU machine, from the repository root; about 5 minutes on one GPU (8 at most):
#
#   1. the CUDA tests (pytest -m cuda: AMP, channels_last, compile, no host sync, device data, exact resume);
#   2. one epoch of experiment=paper_cifar100_resnet18 on a generated CIFAR-100 (5000 + 1000 random images),
#      bf16 and channels_last;
#   3. scripts/bench_train.py on the GPU (whole steps, bf16, channels_last; FLOPs and the share of peak bf16);
#   4. scripts/bench_optim.py on the GPU (the optimizer's own step);
#   5. scripts/bench_train.py --data imagenet (the ImageNet loader on this machine's cores, batches to the GPU).
#
# It ends with one summary: the GPU's name, then pass or FAIL per part with its time and log. The benchmark
# sections are appended to results/benchmarks.md (bench_optim's figures go to results/bench_optim_cuda.json):
# commit them. Exits non-zero when a part failed, and at once (status 1) when torch sees no CUDA GPU.
#
#   bash scripts/gpu_check.sh                  # on the GPU machine
#   bash scripts/gpu_check.sh --cpu-dry-run    # every part at tiny size on the CPU: checks this script
#
# Logs and generated data go to $GPU_CHECK_DIR (default: a new temporary folder), which is kept.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout's code, whatever is installed
PYTHON=${PYTHON:-python}

case "${1:-}" in
  "") dry_run=false ;;
  --cpu-dry-run) dry_run=true ;;
  *) echo "usage: bash scripts/gpu_check.sh [--cpu-dry-run]" >&2; exit 2 ;;
esac

work=${GPU_CHECK_DIR:-$(mktemp -d -t gpu_check.XXXXXX)}
mkdir -p "$work"

if $dry_run; then
  where="CPU dry run (tiny sizes; the CUDA tests skip): $($PYTHON -c 'import torch; print("torch", torch.__version__)')"
  device=cpu
else
  where=$($PYTHON -c '
import torch
if torch.cuda.is_available():
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
else:
    print(f"none {torch.__version__}")
')
  if [[ "$where" == none* ]]; then
    echo "gpu_check: no CUDA GPU: torch ${where#none } sees none. This check needs one;" \
         "bash scripts/gpu_check.sh --cpu-dry-run runs its parts at tiny size on the CPU." >&2
    exit 1
  fi
  device=cuda
fi

summary=()
failed=0

# part NAME LOG TIMEOUT_S COMMAND...: run COMMAND with its output in LOG; record pass or FAIL and the time.
part() {
  local name=$1 log=$work/$2 limit=$3
  shift 3
  echo "== $name"
  local started=$SECONDS status
  timeout "$limit" "$@" >"$log" 2>&1
  status=$?
  local took=$((SECONDS - started))
  if [ "$status" -eq 0 ]; then
    summary+=("  pass  $name (${took} s)")
  else
    failed=1
    [ "$status" -eq 124 ] && name="$name: stopped after $limit s"
    summary+=("  FAIL  $name (exit $status, ${took} s; log: $log)")
    tail -n 20 "$log"
  fi
}

# 1. The CUDA tests.
part "CUDA tests (pytest -m cuda)" pytest.log 300 $PYTHON -m pytest -m cuda -q -p no:cacheprovider

# 2. One epoch of the paper's CIFAR-100 setting on generated data.
if $dry_run; then n_train=64; n_test=32; batch=trainer.batch_size=16; else n_train=5000; n_test=1000; batch=; fi
train_epoch() {
  PYTHONPATH="$PWD/tests:$PYTHONPATH" $PYTHON -c "
from datagen import write_cifar_archive
write_cifar_archive('$work/cifar100', 'cifar100', n_train=$n_train, n_test=$n_test)" &&
  $PYTHON train.py experiment=paper_cifar100_resnet18 "dataset.root=$work/cifar100" dataset.download=false \
    "run_dir=$work/run" trainer.epochs=1 trainer.amp=bf16 trainer.channels_last=true "trainer.device=$device" \
    $batch &&
  test -f "$work/run/summary.json"
}
export -f train_epoch
export work n_train n_test batch device PYTHON
part "one epoch of paper_cifar100_resnet18 (generated CIFAR-100, bf16, channels_last)" train.log 300 \
  bash -c train_epoch

# 3-5. The benchmarks.
if $dry_run; then
  bench=(--model tiny --batch-size 8 --steps 1 --warmup 1 --rounds 1 --data-images 64 --workers 0
         --record "$work/benchmarks.md")
  imagenet=(--data-images 16 --batch-size 8 --rounds 1 --workers 0 --record "$work/benchmarks.md")
  optim=(--device cpu --steps 3 --json "$work/bench_optim.json")
else
  bench=(--device cuda --precision bf16 --channels-last)
  imagenet=(--device cuda --workers 0 4 8)
  optim=(--device cuda --json results/bench_optim_cuda.json)
fi
part "bench_train.py: whole steps and the data path" bench_train.log 300 $PYTHON scripts/bench_train.py "${bench[@]}"
part "bench_optim.py: the optimizer step" bench_optim.log 180 $PYTHON scripts/bench_optim.py "${optim[@]}"
part "bench_train.py --data imagenet: the ImageNet loader" bench_imagenet.log 300 \
  $PYTHON scripts/bench_train.py --data imagenet "${imagenet[@]}"

echo
echo "gpu_check on $where"
printf '%s\n' "${summary[@]}"
if [ "$failed" -eq 0 ]; then
  echo "all parts passed; logs in $work"
else
  echo "some parts FAILED; logs in $work"
fi
exit "$failed"
