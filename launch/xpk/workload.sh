#!/usr/bin/env bash
# Pretraining as an XPK workload (a JobSet on a GKE cluster with TPU node pools): build and push the image, then
# `xpk workload create` with the same train command on every host and restarts after preemption.
#
# Usage: launch/xpk/workload.sh --config configs/oneflow_8b.py:slices2 --workdir gs://BUCKET/runs/8b [train flags...]
#
# Environment (default):
#   CLUSTER (required: an existing `xpk cluster create` cluster)   WORKLOAD (oneflow-<UTC time>)
#   TPU_TYPE (v5p-128)   NUM_SLICES (1; use the config's :slicesN variant so mesh.data = NUM_SLICES)
#   IMAGE (required: e.g. us-docker.pkg.dev/PROJECT/REPO/oneflow_jax:TAG)   BUILD (1: docker build + push IMAGE)
#   MAX_RESTARTS (100)   GRACE_S (300: SIGTERM -> checkpoint save -> exit must fit)   PRIORITY (medium)
#   DRY_RUN (0): print the docker / xpk commands instead of running them
# Data: mount the dataset bucket into the pods (gcsfuse CSI driver, `xpk storage attach`) or copy it into the image;
# Grain reads ArrayRecord through POSIX paths (--config.data.data_dir=/the/mount).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
source "$root/launch/pod_common.sh"
if [[ $# -eq 0 ]]; then
  sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
: "${CLUSTER:?set CLUSTER}" "${IMAGE:?set IMAGE}"
WORKLOAD="${WORKLOAD:-oneflow-$(date -u +%m%d-%H%M)}"
TPU_TYPE="${TPU_TYPE:-v5p-128}" NUM_SLICES="${NUM_SLICES:-1}" BUILD="${BUILD:-1}" DRY_RUN="${DRY_RUN:-0}"
MAX_RESTARTS="${MAX_RESTARTS:-100}" GRACE_S="${GRACE_S:-300}" PRIORITY="${PRIORITY:-medium}"
pod_workdir "$@" >/dev/null
config_preflight "$root" "$@"

run() { if [[ "$DRY_RUN" == 1 ]]; then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi; }
if [[ "$BUILD" == 1 ]]; then
  run docker build -f "$root/launch/xpk/Dockerfile" -t "$IMAGE" "$root"
  run docker push "$IMAGE"
fi
run xpk workload create --cluster "$CLUSTER" --workload "$WORKLOAD" --tpu-type "$TPU_TYPE" \
  --num-slices "$NUM_SLICES" --docker-image "$IMAGE" --priority "$PRIORITY" \
  --max-restarts "$MAX_RESTARTS" --restart-on-user-code-failure --termination-grace-period-seconds "$GRACE_S" \
  --command "bash launch/xpk/entrypoint.sh $(printf '%q ' "$@")"
echo "submitted $WORKLOAD; follow it with: xpk workload list --cluster $CLUSTER --filter-by-job $WORKLOAD"
