# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # App · Upload and segment
# Upload a head-CT slice or scan, pick a trained model, and see the lesion mask, its area or volume,
# and a 3-D view; download the mask. *A teaching tool trained on synthetic data: not a medical
# device, not for diagnosis.* How it works, and how to start it, is below the dashboard.

# %%
# %matplotlib inline
import base64
import html
import io
import json
import os
import re

import ipywidgets as widgets
import keras
import numpy as np
import pandas as pd
from IPython.display import display
from PIL import Image

import strokekit
from strokekit import app, paths, recon3d, report, train
from strokekit import split as splitting
from strokekit.augment import STUDY_AUGMENT
from strokekit.config import get_profile, phantom_config
from strokekit.phantom import generate_phantom, make_volume
from strokekit.preprocess import window_hu

print(f"strokekit {strokekit.__version__} · keras {keras.__version__} ({keras.backend.backend()})")

# %% tags=["parameters"]
PROFILE = get_profile()
RUNS = paths.runs_dir()                 # models are listed from here, and only from here
WORK_DIR = app.default_work_dir()       # uploads are unpacked in a private folder under runs/ and deleted
# The demo model: a few phantom patients, the profile's size and training recipe (strokekit/config.py).
DEMO_RUN = RUNS / "app-demo"
DEMO_PHANTOM = phantom_config(PROFILE)  # the course's phantom and its saved split (notebook 02)
DEMO_SPLIT = paths.data_dir() / "splits" / "phantom_split.json"
DEMO_TRAIN = PROFILE.train_config(
    loss="bce_dice",
    augment=STUDY_AUGMENT,
    early_stopping_patience=0,
    reduce_lr_patience=0,
    preview_slices=0,
)
IN_VOILA = os.environ.get("SERVER_SOFTWARE", "").startswith("voila")
# Without a person to press the button (nbval, a headless run), train the demo model automatically.
AUTO_DEMO = not IN_VOILA
CHECK_LEARNING = PROFILE.name == "quick"   # assert the learning floors (measured in the quick profile)
OVERLAY_WIDTH = 420                     # pixels on screen

# %%
def png_bytes(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def figure_png(fig, dpi: int = 80) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def download_link(data: bytes, filename: str, mime: str, label: str) -> str:
    """An HTML link that downloads ``data``: nothing is written to disk."""
    payload = base64.b64encode(data).decode("ascii")
    return (f'<a class="sk-download-link" download="{html.escape(filename)}" '
            f'href="data:{mime};base64,{payload}">⬇ {html.escape(label)}</a>')


def best_model(choices) -> str | None:
    """The folder of the listed run with the highest validation Dice (else the first)."""
    def dice(folder):
        try:
            value = json.loads((folder / "metrics.json").read_text()).get("dice")
            return float(value) if isinstance(value, (int, float)) and np.isfinite(value) else -1.0
        except (OSError, ValueError, AttributeError):
            return -1.0
    return str(max(choices, key=lambda item: dice(item[1]))[1]) if choices else None


def train_demo_model():
    """A small phantom model in runs/app-demo, so that the app has something to use."""
    data = generate_phantom(DEMO_PHANTOM, progress=False)
    split = splitting.load_or_make_split(data, DEMO_SPLIT, seed=0)
    result = train.train(DEMO_TRAIN, split.dataset(data, "train"), split.dataset(data, "val"),
                         run_dir=DEMO_RUN, split=split, progress=False, previews=False)
    return result.run_dir


state = {"folder": None, "model": None, "config": None, "files": None, "result": None}

model_dd = widgets.Dropdown(description="Model", layout=widgets.Layout(width="460px"))
refresh_btn = widgets.Button(icon="refresh", tooltip="look for new runs", layout=widgets.Layout(width="40px"))
demo_btn = widgets.Button(description="train a small demo model", icon="cogs",
                          tooltip=f"trains a quick phantom model into {DEMO_RUN}",
                          layout=widgets.Layout(width="230px"))
upload = widgets.FileUpload(accept=".png,.jpg,.jpeg,.dcm,.nii,.nii.gz,.gz", multiple=True,
                            description="Upload")
threshold_sl = widgets.FloatSlider(value=0.5, min=0.05, max=0.95, step=0.05, description="Threshold",
                                   continuous_update=False, readout_format=".2f")
pixel_mm = widgets.BoundedFloatText(value=0.0, min=0.0, max=10.0, step=0.05,
                                    description="PNG pixel (mm)", style={"description_width": "initial"},
                                    layout=widgets.Layout(width="190px"))
slice_mm = widgets.BoundedFloatText(value=0.0, min=0.0, max=50.0, step=0.5,
                                    description="slice spacing (mm)", style={"description_width": "initial"},
                                    layout=widgets.Layout(width="210px"))
status = widgets.HTML("Pick a model, then upload a PNG/JPEG slice, a DICOM file or series, or a NIfTI volume.")
overlay = widgets.Image(format="png", width=OVERLAY_WIDTH, layout=widgets.Layout(display="none"))
slice_sl = widgets.IntSlider(description="Slice", min=1, max=1, continuous_update=False,
                             layout=widgets.Layout(display="none", width=f"{OVERLAY_WIDTH}px"))
area = widgets.HTML()
table = widgets.HTML()
download = widgets.HTML()
view3d = widgets.Image(format="png", width=OVERLAY_WIDTH, layout=widgets.Layout(display="none"))
for w, css in ((status, "sk-status"), (overlay, "sk-overlay"), (slice_sl, "sk-slice"),
               (area, "sk-area"), (table, "sk-table"), (download, "sk-download"), (view3d, "sk-3d")):
    w.add_class(css)


def say(message: str, error: bool = False) -> None:
    colour = "#b00020" if error else "#222"
    # Messages quote uploaded file names: escape them, they are not ours.
    status.value = f'<span style="color:{colour}">{html.escape(message)}</span>'


def set_quietly(widget, handler, **values) -> None:
    """Change a widget without running its callback (the caller does what is needed)."""
    widget.unobserve(handler, names="value")
    try:
        for name, value in values.items():
            setattr(widget, name, value)
    finally:
        widget.observe(handler, names="value")


def refresh_models(select: str | None = None) -> None:
    choices = app.list_models(RUNS)
    folders = [str(folder) for _, folder in choices]
    wanted = select if select in folders else best_model(choices)
    set_quietly(model_dd, on_model, options=[(label, str(folder)) for label, folder in choices],
                value=wanted)
    demo_btn.layout.display = "none" if choices else None
    if not choices:
        say(f"No trained model in {RUNS}: train one in notebooks 04-10, or press "
            "'train a small demo model'.", error=True)
    elif wanted != state["folder"]:
        on_model({"new": wanted})


def on_model(change) -> None:
    folder = change["new"]
    state["model"] = state["config"] = None
    state["folder"] = folder
    if not folder:
        return
    try:
        state["model"], state["config"] = app.load_model_for_app(folder, RUNS)
    except app.UploadError as exc:
        say(str(exc), error=True)
        return
    set_quietly(threshold_sl, on_threshold, value=float(state["config"].threshold))
    say(f"Model {os.path.relpath(folder, RUNS)} loaded ({state['config'].arch}, "
        f"{state['config'].image_size} px input). Upload a file.")
    if state["files"]:
        run()


def geometry(result):
    """(pixel spacing (dy, dx) or None, slice thickness or None): from the file, else typed in."""
    spacing = result["spacing"]
    if spacing is None and pixel_mm.value > 0:
        spacing = (pixel_mm.value, pixel_mm.value)
    thickness = result["slice_thickness"] or (slice_mm.value if slice_mm.value > 0 else None)
    return spacing, thickness


def area_text(result, k: int) -> str:
    spacing, thickness = geometry(result)
    n = len(result["mask"])
    parts = []
    for name, px in result["area_px"].items():
        text = f"{name} {int(px[k])} px"
        if spacing is not None:
            text += f" = {int(px[k]) * spacing[0] * spacing[1]:.1f} mm²"
        parts.append(text)
    label = "Lesion area" if len(parts) == 1 else "Area"
    line = f"<b>{label}:</b> " + ("; ".join(parts) if len(parts) > 1 else parts[0].split(" ", 1)[1])
    if spacing is None:
        line += " (pixel size unknown: type it above for mm²)"
    if n > 1:
        line += f" · slice {k + 1} of {n}"
        if spacing is not None and thickness:
            voxel_ml = spacing[0] * spacing[1] * thickness / 1000.0
            volumes = "; ".join(f"{name} {float(px.sum()) * voxel_ml:.2f} mL"
                                for name, px in result["area_px"].items())
            if len(result["area_px"]) == 1:
                volumes = volumes.split(" ", 1)[1]
            line = f"<b>Lesion volume:</b> {volumes}<br>" + line
    return line


def summary_table(result) -> str:
    spacing, thickness = geometry(result)
    rows = []
    for name, px in result["area_px"].items():
        row = {"class": name, "slices with lesion": int((px > 0).sum()), "pixels": int(px.sum())}
        row["area, all slices (mm²)"] = round(float(px.sum()) * spacing[0] * spacing[1], 1) if spacing else None
        row["volume (mL)"] = (round(float(px.sum()) * spacing[0] * spacing[1] * thickness / 1000.0, 3)
                              if spacing and thickness and len(px) > 1 else None)
        rows.append(row)
    frame = pd.DataFrame(rows).dropna(axis=1, how="all")
    style = ("<style>.sk-table-inner {border-collapse: collapse; margin: 6px 0}"
             " .sk-table-inner th, .sk-table-inner td {padding: 2px 10px; border-bottom: 1px solid #ddd;"
             " text-align: right} .sk-table-inner th:first-child, .sk-table-inner td:first-child"
             " {text-align: left}</style>")
    return style + frame.to_html(index=False, border=0, classes="sk-table-inner")


def show_slice(k: int) -> None:
    result = state["result"]
    overlay.value = png_bytes(result["overlays"][k])
    overlay.layout.display = None
    area.value = area_text(result, k)


def show(result) -> None:
    mask = result["mask"]
    n = len(mask)
    lesion_px = (mask > 0).reshape(n, -1).sum(axis=1)
    # The slider counts slices from 1, as the text does.
    set_quietly(slice_sl, on_slice, max=n, value=int(np.argmax(lesion_px)) + 1)
    slice_sl.layout.display = None if n > 1 else "none"
    show_slice(slice_sl.value - 1)
    table.value = summary_table(result)
    spacing, thickness = geometry(result)
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", str(result["case_ids"][0]))[:60] or "upload"
    if n == 1:
        download.value = download_link(app.mask_to_png_bytes(mask[0]), f"{stem}_mask.png",
                                       "image/png", "download the mask (PNG)")
    else:
        dzyx = (thickness, *spacing) if spacing is not None and thickness else None
        download.value = download_link(app.mask_to_nifti_bytes(mask, dzyx), f"{stem}_mask.nii.gz",
                                       "application/gzip", "download the mask (NIfTI, .nii.gz)")
    view3d.layout.display = "none"
    if n > 1 and spacing is not None and thickness:
        data = result["dataset"]
        images = data.images[..., 0] if data.images.ndim == 4 else data.images
        fig = recon3d.plot_3d(
            mask > 0, (thickness, *spacing),
            skull_mask=recon3d.skull_from_hu(images) if data.unit == "HU" else None,
            truth_mask=data.masks if data.masks.any() else None,
            figsize=(5.5, 5.0))
        view3d.value = figure_png(fig)
        view3d.layout.display = None


def hide_results() -> None:
    for w in (overlay, slice_sl, view3d):
        w.layout.display = "none"
    area.value = table.value = download.value = ""


def run() -> None:
    files = state["files"]
    if state["model"] is None:
        say("Choose a model first (or train the demo model).", error=True)
        return
    say(f"Segmenting {len(files)} file(s) ...")
    try:
        result, message = app.handle_upload(files, state["model"], state["config"],
                                            work_dir=WORK_DIR, threshold=threshold_sl.value)
        state["result"] = result
        if result is None:
            hide_results()
            say(message, error=True)
            return
        show(result)
        say(message)
    except Exception as exc:  # noqa: BLE001 - the page shows a message, never a traceback
        hide_results()
        say(f"Something went wrong while showing the result ({type(exc).__name__}: {exc})", error=True)


def on_files(files) -> None:
    """What an upload does; also called by the self-test below with (name, bytes) pairs."""
    state["files"] = [(f["name"], bytes(f["content"])) if isinstance(f, dict) else f for f in files]
    run()


def on_upload(change) -> None:
    if change["new"]:
        on_files(change["new"])
        upload.value = ()  # so that the same file can be uploaded again


def on_slice(change) -> None:
    if state["result"] is not None:
        show_slice(change["new"] - 1)


def on_geometry(change) -> None:
    if state["result"] is not None:
        show(state["result"])


def on_threshold(change) -> None:
    if state["files"] and state["model"] is not None:
        run()


def on_demo(button) -> None:
    demo_btn.disabled = True
    say(f"Training a small demo model into {DEMO_RUN} (about a minute) ...")
    try:
        folder = train_demo_model()
        refresh_models(select=str(folder))
        dice = json.loads((folder / "metrics.json").read_text()).get("dice", float("nan"))
        say(f"Demo model trained and loaded (validation Dice {dice:.2f} on phantom slices of a patient it "
            "never saw): it knows the phantom, not real CT. Upload a file.")
    except Exception as exc:  # noqa: BLE001
        say(f"Training the demo model failed ({type(exc).__name__}: {exc})", error=True)
    finally:
        demo_btn.disabled = False


model_dd.observe(on_model, names="value")
upload.observe(on_upload, names="value")
slice_sl.observe(on_slice, names="value")
threshold_sl.observe(on_threshold, names="value")
pixel_mm.observe(on_geometry, names="value")
slice_mm.observe(on_geometry, names="value")
refresh_btn.on_click(lambda _: refresh_models(select=model_dd.value))
demo_btn.on_click(on_demo)

dashboard = widgets.VBox([
    widgets.HBox([model_dd, refresh_btn, demo_btn]),
    widgets.HBox([upload, threshold_sl]),
    widgets.HBox([pixel_mm, slice_mm]),
    status,
    widgets.HBox([widgets.VBox([overlay, slice_sl]),
                  widgets.VBox([area, table, download, view3d])]),
])
refresh_models()
display(dashboard)

# %% [markdown]
# ## About this app
# **Learning goals**
# - Serve a trained model to people who do not write code: a notebook of widgets, served with Voila.
# - Treat every upload as untrusted: type, size and readability are checked, and a bad file gets a message.
# - Report what a clinician asks for: where the lesion is, how large it is (mm², mL), and a mask to keep.
#
# **Runtime**: a few seconds per upload on a laptop CPU (one 512² slice in about a second, a 40-slice
# volume in a few seconds: `benchmarks/bench_app.py`). Without any trained model, the button trains a
# small demo model on the phantom (about a minute in the quick profile).
#
# **Start it**: `make app` (it runs `tools/serve_app.sh`: Voila on 127.0.0.1, port 8866) and open
# http://127.0.0.1:8866 — only this computer can reach it. The script raises the websocket message
# limit from Tornado's 10 MB to the app's 200 MB upload limit; with a bare `voila notebooks/app.ipynb`
# a larger upload (a DICOM series, an uncompressed NIfTI) is silently dropped by the server. The
# notebook also runs as an ordinary notebook in JupyterLab.
#
# **How it works.** The cells of this notebook only wire widgets to `strokekit.app`, where the logic
# lives and is unit-tested: `list_models` / `load_model_for_app` (models only from the runs folder,
# loaded in Keras safe mode), `handle_upload` (checks each file's name, size, type by extension *and*
# content, reads it in a private folder under `runs/` that is deleted straight after, segments, and
# returns a message instead of raising), `mask_to_png_bytes` / `mask_to_nifti_bytes` for the download
# link (nothing is written to disk). PNG and JPEG files carry no pixel size: type it to get mm², and a
# slice spacing for mL when you upload several slices of one scan.
#
# **Models.** The list shows every run folder under the runs folder that holds `model.keras` and
# `config.json` (notebooks 04–10 write them), with its validation Dice; the best one is picked. If
# there is none, the button trains a small demo model on the phantom; outside Voila (JupyterLab, CI)
# the next cell trains it by itself (about 15 s) and checks that it finds the phantom's lesions, so
# that the self-test below has a model that learned.

# %%
if AUTO_DEMO:                           # headless: (re)train the demo model and check that it learned
    on_demo(demo_btn)
    demo_dice = json.loads((DEMO_RUN / "metrics.json").read_text())["dice"]
    print(f"demo model: validation Dice {demo_dice:.3f} on the phantom")
    assert not CHECK_LEARNING or demo_dice >= 0.5                # it finds the phantom lesion (quick profile floor)
    report.record(demo_val_dice=demo_dice)
if not IN_VOILA:
    print(f"{len(model_dd.options)} model(s) in {RUNS}; selected: {model_dd.value}")
    assert state["model"] is not None

# %% [markdown]
# **Self-test without a browser.** A phantom slice saved as PNG goes through the same handler as a
# browser upload, and then through the dashboard itself; a broken file must give a message, not a traceback.
# (`tests/test_app_browser.py` does the same in Chromium through Voila.) Skipped when served by Voila.

# %%
if not IN_VOILA:
    volume = make_volume(0, phantom_config(PROFILE))
    k = int(np.argmax(volume.lesion_area))
    slice_png = png_bytes(np.rint(window_hu(volume.hu[k], "brain") * 255).astype(np.uint8))
    result, message = app.handle_upload([("phantom_P01.png", slice_png)], state["model"],
                                        state["config"], work_dir=WORK_DIR)
    print(message)
    assert result is not None, message
    assert result["overlays"][0].shape == volume.hu[k].shape + (3,)
    assert result["mask"].shape == (1,) + volume.hu[k].shape and result["area_px"]["lesion"][0] >= 0

    on_files([("phantom_P01.png", slice_png)])
    print(re.sub("<[^>]+>", "", area.value))
    assert overlay.value[:8] == b"\x89PNG\r\n\x1a\n" and overlay.layout.display is None
    assert re.search(r"Lesion area:</b> \d+ px", area.value), area.value
    assert "download" in download.value and "data:image/png;base64," in download.value

    bad, message = app.handle_upload([("scan.png", b"GIF89a not really a png")], state["model"],
                                     state["config"], work_dir=WORK_DIR)
    print(message)
    assert bad is None and "not a PNG image" in message
    assert not any(WORK_DIR.glob("upload-*")), "the upload's temporary folder must be gone"

# %% [markdown]
# ## Exercises
# 1. Upload several PNG slices of one CT-ICH patient from `../shared/data/ct-ich/image/` (consecutive
#    numbers), type a pixel size of 0.45 mm and a slice spacing of 5 mm: the app now reports mL and
#    draws a 3-D view. How far is the volume from the one computed from the reference masks?
# 2. Rename a text file to `scan.dcm` and upload it. Which check stops it, and where is that check in
#    `strokekit/app.py`?
# 3. Move the threshold slider on a volume. Which changes more, the area on one slice or the volume?
#
# ## Summary
# - The app is a notebook of widgets; the logic lives in `strokekit.app` and is tested without a browser.
# - Uploads are checked by extension *and* content, read in a private folder under `runs/`, and deleted.
# - Areas need the pixel size, volumes also the slice spacing; PNG files carry neither.
#
# **Back →** [09 · 3-D reconstruction](09_3d_reconstruction.ipynb)
