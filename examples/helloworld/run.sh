#!/usr/bin/env bash
# Runs Sluice on the helloworld 90/10 example: two local backends (v1, v2) and the proxy,
# then prints curl commands that show the split. Ctrl-C stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/../.."
ADMIN=127.0.0.1:${SLUICE_ADMIN_PORT:-9879}

cargo build --release --bin sluice --example echo_backend

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

target/release/examples/echo_backend --listen 127.0.0.1:5001 --name helloworld-v1 >/dev/null & pids+=($!)
target/release/examples/echo_backend --listen 127.0.0.1:5002 --name helloworld-v2 >/dev/null & pids+=($!)
target/release/sluice run --config examples/helloworld --admin-address "$ADMIN" \
  --health-address 127.0.0.1:9878 --metrics-address 127.0.0.1:9964 & pids+=($!)

for _ in $(seq 100); do curl -fs "http://$ADMIN/ready" >/dev/null 2>&1 && break; sleep 0.1; done
PORT=$(curl -fs "http://$ADMIN/listeners" | grep -o '"127.0.0.1:[0-9]*"' | head -1 | tr -d '"' | cut -d: -f2)

cat <<TXT

Sluice is serving default/envoy-lb-listener on 127.0.0.1:$PORT (and [::1]:$PORT).

  # one request: the JSON names the backend that answered
  curl -s http://127.0.0.1:$PORT/

  # the 90/10 split over 200 requests
  for i in \$(seq 200); do curl -s http://127.0.0.1:$PORT/ | grep -o '"backend":"[^"]*"'; done | sort | uniq -c

  # the live configuration, and the diagnostics
  curl -s http://$ADMIN/config_dump | head -50

Edit examples/helloworld/helloworld.yaml (e.g. the weights) and Sluice reloads it. Ctrl-C stops.
TXT
wait
