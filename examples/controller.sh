#!/usr/bin/env sh
# A tiny controller: submits the example jobs under fresh ids and waits for each result.
# Usage: ./controller.sh [rounds]   (MQTT_URL defaults to mqtt://localhost:1883)
set -eu
rounds=${1:-1}
worker=${MQTT_FS_WORKER:-mqtt-fs-worker}
export MQTT_URL=${MQTT_URL:-mqtt://localhost:1883}
export MQTT_TOPIC=${MQTT_TOPIC:-\$share/workers/jobs/pending}
i=1
while [ "$i" -le "$rounds" ]; do
  for job in hello artifacts failing; do
    id="$job-$(date +%s)-$i"
    # A request with its own steps needs no folder; one for an example job copies it under the new id.
    if [ -d "${JOBS_DIR:-./jobs}/$job" ]; then cp -r "${JOBS_DIR:-./jobs}/$job" "${JOBS_DIR:-./jobs}/$id"; fi
    if "$worker" submit "$id" --wait --timeout 5m; then echo "ok   $id"; else echo "FAIL $id (exit $?)"; fi
  done
  i=$((i + 1))
done
