# Voila settings for the app (notebooks/app.ipynb), read by tools/serve_app.sh
# (--Voila.config_file_paths points here). A traitlets config file: `c` is given by Voila.
#
# Every page visit starts a kernel that holds the notebook's Keras, a model and the last upload
# (0.4-0.95 GB). Two things give that memory back:
#   1. When the page closes, Voila's page sends a shutdown request (a POST from its 'beforeunload'
#      handler) that carries the `_xsrf` cookie; Voila never sets that cookie, so the server refused
#      the request (403, voila-dashboards/voila#1458) and every kernel lived until the server
#      stopped. The hook below sets it: reading `xsrf_token` makes Tornado send the cookie with
#      the page, so the shutdown request passes the XSRF check (which stays on).
#   2. A kernel whose page is gone without a word (a crashed browser, a laptop put to sleep, a tab
#      closed while the notebook still ran) is culled after CULL_IDLE_S seconds without activity
#      and without a connected page. An open page is never culled, however long it sits idle.
# Options given on the command line win over these (the browser test shortens the timeouts).

CULL_IDLE_S = 600       # a kernel idle this long, with no page connected, is shut down
CULL_EVERY_S = 60       # how often the server looks for such kernels
UPLOAD_LIMIT = 209_715_200  # bytes: strokekit.app.MAX_UPLOAD_BYTES (200 MB), rounded up to 200 MiB


def set_xsrf_cookie(req_handler, notebook, cwd):
    """Voila's prelaunch hook: send the `_xsrf` cookie with the page (see 1. above)."""
    req_handler.xsrf_token  # noqa: B018 - the property sets the cookie as a side effect
    return None             # the notebook is served unchanged


c = get_config()  # noqa: F821 - provided by traitlets when it reads this file
c.VoilaConfiguration.prelaunch_hook = set_xsrf_cookie
c.MappingKernelManager.cull_idle_timeout = CULL_IDLE_S
c.MappingKernelManager.cull_interval = CULL_EVERY_S
c.MappingKernelManager.cull_connected = False   # never pull the kernel from under an open page
c.MappingKernelManager.cull_busy = False        # nor from a segmentation that is still running
# Uploads travel over the kernel's websocket in one message; Tornado's default limit is 10 MB and
# a DICOM series or NIfTI volume is often larger.
c.Voila.tornado_settings = {"websocket_max_message_size": UPLOAD_LIMIT}
c.Voila.ip = "127.0.0.1"  # only this computer can reach the app
