#!/usr/bin/env bash
# Runs comfyd in the foreground for trying it by hand: a throwaway data dir, a dev API key, and the ComfyUI at
# $COMFYUI_API_URL (default http://127.0.0.1:8188). It installs nothing and never builds ComfyUI.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
    cat <<'EOF'
Usage: scripts/dev-run.sh [--port P] [--data-dir DIR] [--config FILE] [--keep]

Starts comfyd from this checkout's .venv (made by scripts/setup.sh) on 127.0.0.1, in the foreground;
Ctrl-C stops it (running jobs drain for COMFYD_DRAIN_SECONDS, 5 here).

  --port P        listen port (default $COMFYD_PORT or 9090)
  --data-dir DIR  keep the database in DIR instead of a fresh temporary folder
  --config FILE   a comfyd TOML file (default: none, built-in defaults plus the environment)
  --keep          do not delete the temporary data dir on exit

Environment:
  COMFYUI_API_URL     ComfyUI server(s), comma-separated (default http://127.0.0.1:8188)
  COMFYUI_OUTPUTS     ComfyUI's output folder, when it runs on this machine (else outputs come over /view)
  MANAGEMENT_API_KEY  API key to require (default: a random dev-... key, printed below)
EOF
}

PORT=${COMFYD_PORT:-9090}
DATA_DIR=
CONFIG=
KEEP=0
while (($#)); do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --port) PORT=${2:?--port needs a number}; shift ;;
        --data-dir) DATA_DIR=${2:?--data-dir needs a folder}; shift ;;
        --config) CONFIG=${2:?--config needs a file}; shift ;;
        --keep) KEEP=1 ;;
        *) printf 'dev-run.sh: unknown option %s (see --help)\n' "$1" >&2; exit 2 ;;
    esac
    shift
done

PY=$ROOT/.venv/bin/python
if [[ ! -x $PY ]] || ! "$PY" -c 'import comfyd.cli' 2>/dev/null; then
    printf 'dev-run.sh: no development environment in %s/.venv: run scripts/setup.sh first\n' "$ROOT" >&2
    exit 1
fi

export COMFYUI_API_URL=${COMFYUI_API_URL:-http://127.0.0.1:8188}
export MANAGEMENT_API_KEY=${MANAGEMENT_API_KEY:-dev-$("$PY" -c 'import secrets; print(secrets.token_hex(8))')}
export COMFYD_DRAIN_SECONDS=${COMFYD_DRAIN_SECONDS:-5}

if [[ -z $DATA_DIR ]]; then
    DATA_DIR=$(mktemp -d "${TMPDIR:-/tmp}/comfyd-dev.XXXXXX")
    if ((KEEP)); then
        trap 'printf "\ndata kept in %s\n" "$DATA_DIR"' EXIT
    else
        trap 'rm -rf "$DATA_DIR"' EXIT
    fi
fi

comfyui_version() {
    "$PY" - "$1" <<'EOF'
import json, sys, urllib.request
with urllib.request.urlopen(sys.argv[1].rstrip("/") + "/system_stats", timeout=3) as response:
    print(json.load(response)["system"].get("comfyui_version", "?"))
EOF
}

# Is ComfyUI there? comfyd starts either way (jobs wait in the queue until a backend answers), but say so now.
IFS=',' read -r -a urls <<<"$COMFYUI_API_URL"
for url in "${urls[@]}"; do
    url=${url// /}
    if version=$(comfyui_version "$url" 2>/dev/null); then
        printf 'ComfyUI %s answers at %s\n' "$version" "$url"
    else
        cat >&2 <<EOF
warning: no ComfyUI answers at $url (GET /system_stats failed).
  comfyd starts anyway and keeps retrying; submitted jobs wait in the queue until it answers.
  Point comfyd at a running ComfyUI:   COMFYUI_API_URL=http://HOST:PORT scripts/dev-run.sh
  or start your own ComfyUI checkout (this project does not ship one), e.g. in its folder:
      python main.py --listen 127.0.0.1 --port 8188        (add --cpu on a machine without a GPU)
EOF
    fi
done

cat <<EOF

comfyd (dev)   http://127.0.0.1:$PORT      data: $DATA_DIR
API key        $MANAGEMENT_API_KEY
try            curl -s http://127.0.0.1:$PORT/health
               curl -s -H 'X-API-Key: $MANAGEMENT_API_KEY' http://127.0.0.1:$PORT/v1/comfyui/models
               curl -s -H 'X-API-Key: $MANAGEMENT_API_KEY' -H 'Content-Type: application/json' \\
                    -d '{"workflow": '"\$(cat workflow_api.json)"'}' http://127.0.0.1:$PORT/v1/comfyui/workflow
               curl -s http://127.0.0.1:$PORT/metrics
stop           Ctrl-C

EOF

args=(serve --host 127.0.0.1 --port "$PORT" --data-dir "$DATA_DIR")
if [[ -n $CONFIG ]]; then
    args+=(--config "$CONFIG")
fi
# Not exec: the EXIT trap removes the throwaway data dir once comfyd has stopped.
"$PY" -m comfyd "${args[@]}"
