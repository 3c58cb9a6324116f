#!/usr/bin/env bash
# Serve notebooks/app.ipynb with Voila on this computer only: http://127.0.0.1:${PORT:-8866}
#
#   tools/serve_app.sh              # or: make app
#   PORT=9000 tools/serve_app.sh
#
# Voila's settings are in tools/app_server/voila.py: each page's kernel is shut down when the page
# closes and culled after 10 minutes idle without a page (a kernel holds 0.4-0.95 GB), and the
# websocket message limit is raised from Tornado's 10 MB to the app's upload limit
# (strokekit.app.MAX_UPLOAD_BYTES, 200 MB), since an upload travels in one message. Extra
# arguments are passed on to voila and win over that file, e.g.
#   tools/serve_app.sh --MappingKernelManager.cull_idle_timeout=120
# (Voila then reads its config from that folder only, not from ~/.jupyter.)
set -euo pipefail
cd "$(dirname "$0")/.."
VOILA="${VENV:-.venv}/bin/voila"
if [ ! -x "$VOILA" ]; then
    echo "voila is not installed in ${VENV:-.venv}: run '${VENV:-.venv}/bin/pip install voila' (or make install)" >&2
    exit 1
fi
exec "$VOILA" notebooks/app.ipynb --no-browser --port="${PORT:-8866}" \
    --Voila.config_file_paths="$PWD/tools/app_server" "$@"
