#!/bin/sh
# Re-record fixtures/transcripts/tools_*.jsonl from the client inputs in transcript_inputs/ (run from anywhere).
set -e
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
SERVER="-m tools --backend contree --url http://127.0.0.1:9 --token transcript-token --auth-type jwt --cache-files :memory: --cache-general :memory:"
record() {
  # the recorder reads a pipe (not a file redirect)
  cat "tests/tools/transcript_inputs/$1.ndjson" |
    $PY -m protocol.transcript record --out "fixtures/transcripts/$1.jsonl" --description "$2" -- $PY $SERVER \
    > /dev/null
  sed -i "1s|\"argv\":\[\"$PY\"|\"argv\":[\"{python}\"|" "fixtures/transcripts/$1.jsonl"
}
record tools_surface "contree-mcp tools surface: tools/resources/templates/prompts lists (remote backend, no backend calls)"
record tools_calls "contree-mcp tool calls that need no backend: guides, registry token page, validation errors, prompts, completion"
