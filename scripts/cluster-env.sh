#!/usr/bin/env bash
# Write ~/.searchsvc/cluster.env from YOUR environment, for `ray up` to copy to every node (file_mounts).
# The nodes' Ray processes start with it, so workers find the store's keys in their environment (boto3's
# own chain) and nothing secret is ever written into a config, the store or a log. Mode 600.
#
#   export AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...   # the MinIO root user the head creates
#   export RAY_AUTH_TOKEN=$(openssl rand -hex 16)            # optional: Ray token authentication
#   bash scripts/cluster-env.sh && ray up cluster.yaml
set -euo pipefail
: "${AWS_ACCESS_KEY_ID:?set AWS_ACCESS_KEY_ID (the MinIO user) first}"
: "${AWS_SECRET_ACCESS_KEY:?set AWS_SECRET_ACCESS_KEY (the MinIO password, 8+ characters) first}"
mkdir -p ~/.searchsvc
umask 077
{
  echo "AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID}"
  echo "AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY}"
  echo "AWS_DEFAULT_REGION=${AWS_DEFAULT_REGION:-us-east-1}"
  echo "RAY_USAGE_STATS_ENABLED=0"
  if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then
    echo "RAY_AUTH_MODE=token"
    echo "RAY_AUTH_TOKEN=${RAY_AUTH_TOKEN}"
  fi
} > ~/.searchsvc/cluster.env
echo "wrote ~/.searchsvc/cluster.env (mode 600); keys are not printed"
