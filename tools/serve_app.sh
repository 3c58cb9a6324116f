#!/usr/bin/env bash
# Serve notebooks/app.ipynb with Voila on this computer only: http://127.0.0.1:${PORT:-8866}
#
#   tools/serve_app.sh              # or: make app
#   PORT=9000 tools/serve_app.sh
#
# Uploads travel over the kernel's websocket in one message, so the message limit is raised from
# Tornado's 10 MB to the app's upload limit (strokekit.app.MAX_UPLOAD_BYTES, 200 MB); a DICOM series
# or NIfTI volume is often larger than 10 MB. Extra arguments are passed on to voila.
set -euo pipefail
cd "$(dirname "$0")/.."
VOILA="${VENV:-.venv}/bin/voila"
if [ ! -x "$VOILA" ]; then
    echo "voila is not installed in ${VENV:-.venv}: run '${VENV:-.venv}/bin/pip install voila' (or make install)" >&2
    exit 1
fi
exec "$VOILA" notebooks/app.ipynb --no-browser --port="${PORT:-8866}" --Voila.ip=127.0.0.1 \
    --Voila.tornado_settings="{'websocket_max_message_size': 209715200}" "$@"
