#!/usr/bin/env bash
# Start MinIO on the head node: data on the head's disk (~/minio-data), listening on the cluster's private
# address only (port 9000; console on 127.0.0.1:9001), root user from ~/.searchsvc/cluster.env, one bucket
# `searchsvc`. Idempotent: a running MinIO is left alone. Run by cluster.yaml's head_start_ray_commands.
set -euo pipefail
set -a; . ~/.searchsvc/cluster.env; set +a
PRIVATE_IP=${PRIVATE_IP:-$(hostname -I | awk '{print $1}')}
if ! command -v minio >/dev/null; then
  curl -fsSL -o /tmp/minio https://dl.min.io/server/minio/release/linux-amd64/minio
  sudo install -m 755 /tmp/minio /usr/local/bin/minio
fi
if ! pgrep -x minio >/dev/null; then
  mkdir -p ~/minio-data
  MINIO_ROOT_USER="$AWS_ACCESS_KEY_ID" MINIO_ROOT_PASSWORD="$AWS_SECRET_ACCESS_KEY" MINIO_BROWSER_REDIRECT=off \
    nohup minio server ~/minio-data --address "${PRIVATE_IP}:9000" --console-address 127.0.0.1:9001 \
    > ~/minio.log 2>&1 &
fi
for _ in $(seq 60); do curl -fs "http://${PRIVATE_IP}:9000/minio/health/live" >/dev/null && break; sleep 1; done
~/venv/bin/python - "$PRIVATE_IP" <<'PY'
import sys, boto3
s3 = boto3.client("s3", endpoint_url=f"http://{sys.argv[1]}:9000")
try:
    s3.create_bucket(Bucket="searchsvc")
except (s3.exceptions.BucketAlreadyOwnedByYou, s3.exceptions.BucketAlreadyExists):
    pass
print(f"MinIO at http://{sys.argv[1]}:9000, bucket searchsvc")
PY
