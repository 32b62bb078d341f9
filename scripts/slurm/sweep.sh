#!/usr/bin/env bash
# A sweep on SLURM through hydra-submitit-launcher: one job per run (a job array), each requeued when it is
# preempted or reaches its time limit, continuing from its last checkpoint (configs/hydra/launcher/slurm.yaml).
# Run it on the login node inside tmux or screen: Hydra's launcher submits the jobs, then waits for them and
# reports each one's result. Jobs' logs: runs/sweeps/<date>_<time>/.submitit/. Relaunching the same command skips the
# finished runs and continues the others.
#
#   PARTITION=gpu ACCOUNT=myproject bash scripts/slurm/sweep.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${PARTITION:?set PARTITION to your GPU partition}"
export FSAM_RUNS="${FSAM_RUNS:-$PWD/runs}"       # shared storage, seen by every node

python train.py -m hydra/launcher=slurm \
    hydra.launcher.partition="$PARTITION" ${ACCOUNT:+hydra.launcher.account="$ACCOUNT"} \
    hydra.launcher.timeout_min=720 hydra.launcher.gpus_per_node=1 \
    experiment=paper_cifar100_resnet18 \
    optimizer=sgd,sam,fsam trainer.seed=1,2,3 \
    trainer.checkpoint_every_steps=500
