#!/usr/bin/env sh
# A tiny controller: submits example jobs under fresh ids and waits for each result.
# Usage: ./controller.sh [rounds]   (MQTT_URL defaults to mqtt://localhost:1883; the compose fleet is on 11883)
# JOBS lists the examples to submit (default: "hello artifacts"; add "failing" to see a failure).
# MQTT_FS_WORKER is the command to run, e.g. MQTT_FS_WORKER="node ../bin/mqtt-fs-worker.js" in a checkout.
# Exits 0 when every job succeeded, 1 when any did not (or the command failed).
set -eu
rounds=${1:-1}
worker=${MQTT_FS_WORKER:-mqtt-fs-worker}
jobs_dir=${JOBS_DIR:-./jobs}
export MQTT_URL=${MQTT_URL:-mqtt://localhost:1883}
export MQTT_TOPIC=${MQTT_TOPIC:-jobs/pending}
failed=0
i=1
while [ "$i" -le "$rounds" ]; do
  for job in ${JOBS:-hello artifacts}; do
    id="$job-$(date +%s)-$i"
    # The job's definition and inputs under the new id, without an earlier run's results/.
    if [ -d "$jobs_dir/$job" ]; then
      mkdir "$jobs_dir/$id" && cp -r "$jobs_dir/$job/." "$jobs_dir/$id/" && rm -rf "$jobs_dir/$id/results"
    fi
    # $worker is split into words on purpose: it may be a command line.
    if $worker submit "$id" --wait --timeout 5m; then echo "ok   $id"; else echo "FAIL $id (exit $?)"; failed=1; fi
  done
  i=$((i + 1))
done
exit "$failed"
