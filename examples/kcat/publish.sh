#!/usr/bin/env bash
# Check a file of send requests (JSON Lines, one envelope per line) and publish them with
# kcat to the gateway's requests topic, key = payload.app_id (an app's records stay in one
# partition, in order). Nothing is published unless every record is valid.
#
#   examples/kcat/publish.sh requests.jsonl [BROKERS]      (BROKERS: localhost:9092)
#
# Checked by `gateway validate` (the gateway's own decoder) when it is on the PATH, else
# against schemas/send-request.schema.json with check-jsonschema. Needs jq and kcat.
# REQUESTS_TOPIC overrides the topic; SCHEMA the schema file; extra kcat options
# (security, -X ...) go in KCAT_OPTS.
set -euo pipefail

file=${1:?usage: publish.sh FILE.jsonl [BROKERS]}
brokers=${2:-localhost:9092}
topic=${REQUESTS_TOPIC:-sinch.outbound.requests}
here=$(cd "$(dirname "$0")" && pwd)
schema=${SCHEMA:-$here/../../schemas/send-request.schema.json}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
grep -v '^[[:space:]]*$' "$file" >"$work/records.jsonl" || true
count=$(wc -l <"$work/records.jsonl")
if [ "$count" -eq 0 ]; then
  echo "publish.sh: no records in $file" >&2
  exit 1
fi

if command -v gateway >/dev/null 2>&1; then
  gateway validate --quiet "$work/records.jsonl"
elif command -v check-jsonschema >/dev/null 2>&1; then
  split -l 1 -a 6 --additional-suffix=.json "$work/records.jsonl" "$work/record-"
  check-jsonschema --schemafile "$schema" "$work"/record-*.json
else
  echo "publish.sh: install sinch-gateway (gateway validate) or check-jsonschema" >&2
  exit 2
fi

# key<TAB>value, one record a line; the value is published byte for byte as written.
jq -r '.payload.app_id' "$work/records.jsonl" | paste -d '\t' - "$work/records.jsonl" |
  kcat -P -b "$brokers" -t "$topic" -K $'\t' ${KCAT_OPTS:-}
echo "published $count records to $topic"
