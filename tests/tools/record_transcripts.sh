#!/bin/sh
# Re-record fixtures/transcripts/tools_*.jsonl from the client inputs in transcript_inputs/ (run from anywhere).
set -e
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
# A fixed allowed root: the instructions show it, and a clone may live anywhere.
SERVER="-m tools --allowed-root /srv/project --backend contree --url http://127.0.0.1:9 --token transcript-token --auth-type jwt --cache-files :memory: --cache-general :memory:"
record() {
  # the recorder reads a pipe (not a file redirect)
  cat "tests/tools/transcript_inputs/$1.ndjson" |
    $PY -m protocol.testing.transcript record --out "fixtures/transcripts/$1.jsonl" --description "$2" -- $PY $SERVER \
    > /dev/null
  sed -i "1s|\"argv\":\[\"$PY\"|\"argv\":[\"{python}\"|" "fixtures/transcripts/$1.jsonl"
}
record tools_surface "contree-mcp tools surface: tools/resources/templates/prompts lists (remote backend, no backend calls)"
record tools_calls "contree-mcp tool calls that need no backend: guides, registry token page, validation errors, prompts, completion"

# The embedded-engine transcript: a fresh engine home (busybox seeded) and workdir, one lockstep session.
# Sandbox limits are given (whoami and run results report them; derived from the host they would vary).
# Sends refer to server-chosen values by <uuid-N> (N-th UUID the server sent) and <rsync-N>.
ENGINE_TMP=$(mktemp -d)
# the server starts the home's engine service, which outlives it: stop it before removing the home
trap '$PY -m contree.service stop --now --home "$ENGINE_TMP/engine" > /dev/null; rm -rf "$ENGINE_TMP"' EXIT
VARS=$($PY -m tests.tools.test_engine_transcript "$ENGINE_TMP")
HOME_DIR=$(echo "$VARS" | sed -n 's/^home=//p')
WORK_DIR=$(echo "$VARS" | sed -n 's/^workdir=//p')
MASKS=""
for f in mcp_version duration consumed_cpu consumed_memory image_size block_input block_output cost elapsed_time \
  involuntary_switches max_rss monotonic_time page_faults page_faults_io shared_memory signals swaps \
  system_cpu_time unshared_memory user_cpu_time voluntary_switches total_bytes layer_bytes reclaimable_bytes \
  output_bytes uploads_bytes chunks_bytes other_bytes freed_bytes idle_seconds host_port url pause_ms total_ms \
  pid; do
  MASKS="$MASKS --mask $f"
done
# shellcheck disable=SC2086
cat tests/tools/transcript_inputs/tools_engine.ndjson |
  PYTHONPATH=$PWD $PY -m protocol.testing.transcript record --out fixtures/transcripts/tools_engine.jsonl \
    --description "contree-mcp on the embedded engine: every tool, resource, template and prompt, a completion" \
    --var "home=$HOME_DIR" --var "workdir=$WORK_DIR" --numbered-uuids --capture rsync --lockstep $MASKS \
    --cwd "$WORK_DIR" -- '{python}' -m tools --backend local --home '{home}' --allowed-root '{workdir}' \
    --sandbox-memory 512M --engine-memory 2G --sandbox-cpus 1 --engine-cpus 2 --sandbox-pids 512 \
    --engine-pids 4096 > /dev/null
