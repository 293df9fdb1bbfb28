#!/bin/bash
# Sharded index build as a SLURM job array: each task indexes a disjoint, stable slice of the
# images (by a hash of the path) into one Milvus collection; re-running a task adds nothing twice.
# Build the index folder once first (it creates the collection; --shard 0/1 with an empty folder
# works too), then share the folder (a few MB: manifest, model, encoder) with the workers:
#   dfsnet index build /shared/photos.index --model model.safetensors --images /data/photos \
#       --backend milvus --uri http://milvus:19530 --collection photos --shard 0/64
#   sbatch --array=1-63 deploy/index-add.slurm.sh
#SBATCH --job-name=dfsnet-add
#SBATCH --cpus-per-task=8
#SBATCH --gres=gpu:1
#SBATCH --time=04:00:00
set -euo pipefail
N=64
dfsnet index add /shared/photos.index --images /data/photos --shard "${SLURM_ARRAY_TASK_ID}/${N}" \
    --device auto --no-progress
