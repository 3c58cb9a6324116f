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
# and a 3-D view; download the mask. *A teaching tool trained on a synthetic phantom and a few CT
# scans: not a medical device, not for diagnosis.* How it works, and how to start it, is below the dashboard.

# %%
# %matplotlib inline
import os
import re

import ipywidgets as widgets
import keras
import numpy as np
from IPython.display import display

import strokekit
from strokekit import app, paths, report, train
from strokekit import split as splitting
from strokekit.augment import STUDY_AUGMENT
from strokekit.config import get_profile, phantom_config
from strokekit.phantom import generate_phantom, make_volume
from strokekit.preprocess import window_hu
from strokekit.runs import RunFolder

# %%
print(f"strokekit {strokekit.__version__} · keras {keras.__version__} ({keras.backend.backend()})")

# %% tags=["parameters"]
PROFILE = get_profile()
RUNS = paths.runs_dir()                 # models are listed from here, and only from here
WORK_DIR = app.default_work_dir()       # uploads are unpacked in a private folder under runs/ and deleted
# The demo model: a few phantom patients, the profile's size and training recipe (strokekit/config.py).
DEMO_RUN = RUNS / "app-demo"
DEMO_PHANTOM = phantom_config(PROFILE)  # the course's phantom and its saved split (notebook 02)
DEMO_SPLIT = paths.data_dir() / "splits" / "phantom_split.json"
DEMO_TRAIN = PROFILE.train_config(loss="bce_dice", augment=STUDY_AUGMENT, early_stopping_patience=0,
                                  reduce_lr_patience=0, preview_slices=0)
IN_VOILA = os.environ.get("SERVER_SOFTWARE", "").startswith("voila")
# Without a person to press the button (nbval, a headless run), train the demo model automatically.
AUTO_DEMO = not IN_VOILA
CHECK_LEARNING = PROFILE.name == "quick"   # assert the learning floors (measured in the quick profile)
OVERLAY_WIDTH = 420                     # pixels on screen

# %% [markdown]
# The dashboard's parts, cell by cell: the widgets, what each widget does, the demo model, and the
# layout. Every number, text and picture the page shows comes from `strokekit.app` (see *How it works* below);
# these cells only put them into widgets.
#
# First the controls: which model, the upload, the threshold, and the geometry a PNG does not carry.

# %%
state = {"folder": None, "model": None, "config": None, "files": None, "result": None}
model_dd = widgets.Dropdown(description="Model", layout=widgets.Layout(width="98%"))
refresh_btn = widgets.Button(icon="refresh", tooltip="look for new runs", layout=widgets.Layout(width="40px"))
demo_btn = widgets.Button(description="train a small demo model", icon="cogs",
                          tooltip=f"trains a quick phantom model into {DEMO_RUN}",
                          layout=widgets.Layout(width="230px"))
upload = widgets.FileUpload(accept=".png,.jpg,.jpeg,.dcm,.nii,.nii.gz,.gz", multiple=True,
                            description="Upload")
threshold_sl = widgets.FloatSlider(value=0.5, min=0.05, max=0.95, step=0.05, description="Threshold",
                                   continuous_update=False, readout_format=".2f")

# %%
pixel_mm = widgets.BoundedFloatText(value=0.0, min=0.0, max=10.0, step=0.05,
                                    description="pixel size (mm)", style={"description_width": "initial"},
                                    layout=widgets.Layout(width="200px"))
slice_mm = widgets.BoundedFloatText(value=0.0, min=0.0, max=50.0, step=0.5,
                                    description="slice spacing (mm)", style={"description_width": "initial"},
                                    layout=widgets.Layout(width="210px"))
geometry_hint = widgets.HTML(
    "<small>mm² needs the pixel size; mL and the 3-D view also need the slice spacing. DICOM and NIfTI "
    "files carry both, PNG and JPEG neither: type them for this upload (a new upload clears them).</small>")
status = widgets.HTML("Pick a model, then upload a PNG/JPEG slice, a DICOM file or series, or a NIfTI volume.")

# %% [markdown]
# Then the result panel. Each part gets a CSS class (`sk-overlay`, `sk-area`, ...) by which the browser test
# (`tests/test_app_browser.py`) finds it on the page.

# %%
overlay = widgets.Image(format="png", width=OVERLAY_WIDTH, layout=widgets.Layout(display="none"))
slice_sl = widgets.IntSlider(description="Slice", min=1, max=1, continuous_update=False,
                             layout=widgets.Layout(display="none", width=f"{OVERLAY_WIDTH}px"))
area = widgets.HTML()
table = widgets.HTML()
download = widgets.HTML()
view3d = widgets.Image(format="png", width=OVERLAY_WIDTH, layout=widgets.Layout(display="none"))
for w, css in ((status, "sk-status"), (overlay, "sk-overlay"), (slice_sl, "sk-slice"), (area, "sk-area"),
               (table, "sk-table"), (download, "sk-download"), (view3d, "sk-3d"), (pixel_mm, "sk-pixel"),
               (slice_mm, "sk-spacing"), (model_dd, "sk-model")):
    w.add_class(css)

# %% [markdown]
# What each widget does. The status line (with a spinner while the kernel segments) and a lock on the
# controls during segmentation:

# %%
def say(message: str, error: bool = False, busy: bool = False) -> None:
    status.value = app.status_html(message, error=error, busy=busy)


def set_busy(busy: bool) -> None:
    """No new upload, model or threshold while the kernel segments."""
    for w in (upload, model_dd, threshold_sl, refresh_btn):
        w.disabled = busy

# %%
def refresh_models(select: str | None = None) -> None:
    choices = app.list_models(RUNS)
    folders = [str(folder) for _, folder in choices]
    best = app.default_model(choices, RUNS)   # the best for CT: a few-shot CT run, else the best phantom run
    wanted = select if select in folders else (str(best) if best else None)
    app.set_quietly(model_dd, on_model, options=[(label, str(folder)) for label, folder in choices], value=wanted)
    demo_btn.layout.display = "none" if choices else None
    if not choices:
        say(f"No trained model in {RUNS}: train one in notebooks 04-10, or press "
            "'train a small demo model'.", error=True)
    elif wanted != state["folder"]:
        on_model({"new": wanted})

# %%
def on_model(change) -> None:
    folder = state["folder"] = change["new"]
    state["model"] = state["config"] = None
    if not folder:
        return
    try:
        state["model"], state["config"] = app.load_model_for_app(folder, RUNS)
    except app.UploadError as exc:
        say(str(exc), error=True)
        return
    app.set_quietly(threshold_sl, on_threshold, value=float(state["config"].threshold))
    say(app.model_loaded_text(folder, state["config"], RUNS))
    if state["files"]:
        run()

# %%
def shown_result():
    """The last result, measured with the geometry that applies (the file's, else the typed one)."""
    return app.with_geometry(state["result"], pixel_mm.value, slice_mm.value)


def show_slice(k: int) -> None:
    shown = shown_result()
    overlay.value = app.png_bytes(shown["overlays"][k])
    overlay.layout.display = None
    area.value = app.slice_text(shown, k)

# %%
def show_3d(shown) -> None:
    """The 3-D view of a stack, when its pixel size and slice spacing are known."""
    view3d.layout.display = "none"
    png = app.view_3d_png(shown)
    if png is not None:
        view3d.value = png
        view3d.layout.display = None


def hide_results() -> None:
    for w in (overlay, slice_sl, view3d):
        w.layout.display = "none"
    area.value = table.value = download.value = ""

# %%
def show(first: bool = False) -> None:
    """Show the last result; a new one opens on the slice with the most lesion inside the brain."""
    shown = shown_result()
    n = len(shown["mask"])
    if first:  # the slider counts slices from 1, as the text does
        app.set_quietly(slice_sl, on_slice, max=n, value=int(shown["focus_slice"]) + 1)
    slice_sl.layout.display = None if n > 1 else "none"
    show_slice(slice_sl.value - 1)
    table.value = app.result_table_html(shown)
    download.value = app.mask_download_html(shown)
    show_3d(shown)
    say(app.describe_result(shown, shown["label"]))   # the status line: the same numbers as the panel

# %%
def segment_and_show(files) -> None:
    """Segment the files with the chosen model and show the result, or say why not."""
    result, message = app.handle_upload(files, state["model"], state["config"],
                                        work_dir=WORK_DIR, threshold=threshold_sl.value)
    state["result"] = result
    if result is None:
        hide_results()
        say(message, error=True)
        return
    show(first=True)

# %%
def run() -> None:
    files = state["files"]
    if state["model"] is None:
        say("Choose a model first (or train the demo model).", error=True)
        return
    say(f"Segmenting {len(files)} file(s) ...", busy=True)
    set_busy(True)
    try:
        segment_and_show(files)
    except Exception as exc:  # noqa: BLE001 - the page shows a message, never a traceback
        hide_results()
        say(f"Something went wrong while showing the result ({type(exc).__name__}: {exc})", error=True)
    finally:
        set_busy(False)

# %%
def on_files(files) -> None:
    """What an upload does; also called by the self-test below with (name, bytes) pairs."""
    if state["result"] is not None:  # values typed for the upload on screen are not this one's
        app.set_quietly(pixel_mm, on_geometry, value=0.0)
        app.set_quietly(slice_mm, on_geometry, value=0.0)
    state["files"] = [(f["name"], bytes(f["content"])) if isinstance(f, dict) else f for f in files]
    run()


def on_upload(change) -> None:
    if change["new"]:
        on_files(change["new"])
        upload.value = ()  # so that the same file can be uploaded again

# %%
def on_slice(change) -> None:
    if state["result"] is not None:
        show_slice(change["new"] - 1)


def on_geometry(change) -> None:
    if state["result"] is not None:
        show()


def on_threshold(change) -> None:
    if state["files"] and state["model"] is not None:
        run()

# %%
def train_demo_model():
    """A small phantom model in runs/app-demo, so that the app has something to use."""
    data = generate_phantom(DEMO_PHANTOM, progress=False)
    split = splitting.load_or_make_split(data, DEMO_SPLIT, seed=0)
    result = train.train(DEMO_TRAIN, split.dataset(data, "train"), split.dataset(data, "val"),
                         run_dir=DEMO_RUN, split=split, progress=False, previews=False, overwrite=True)
    return result.run_dir

# %%
def on_demo(button) -> None:
    demo_btn.disabled = True
    say(f"Training a small demo model into {DEMO_RUN} (this message changes when it is done) ...", busy=True)
    try:
        folder = train_demo_model()
        refresh_models(select=str(folder))
        dice = RunFolder.open(folder).metrics.get("dice", float("nan"))
        say(f"Demo model trained and loaded (validation Dice {dice:.2f} on phantom slices of a patient it "
            "never saw): it knows the phantom, not real CT. Upload a file.")
    except Exception as exc:  # noqa: BLE001
        say(f"Training the demo model failed ({type(exc).__name__}: {exc})", error=True)
    finally:
        demo_btn.disabled = False

# %%
model_dd.observe(on_model, names="value")
upload.observe(on_upload, names="value")
slice_sl.observe(on_slice, names="value")
threshold_sl.observe(on_threshold, names="value")
pixel_mm.observe(on_geometry, names="value")
slice_mm.observe(on_geometry, names="value")
refresh_btn.on_click(lambda _: refresh_models(select=model_dd.value))
demo_btn.on_click(on_demo)

# %% [markdown]
# The layout: the controls in three rows, the status line, then the picture on the left and the numbers on the right.

# %%
dashboard = widgets.VBox([
    widgets.HBox([model_dd, refresh_btn, demo_btn]),
    widgets.HBox([upload, threshold_sl]),
    widgets.HBox([pixel_mm, slice_mm, geometry_hint]),
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
# small demo model on the phantom with the profile's recipe: a short training run, the one wait in the
# app that is longer than an upload.
#
# **Start it**: `make app` (it runs `tools/serve_app.sh`: Voila on 127.0.0.1, port 8866, with the
# settings in `tools/app_server/voila.py`) and open http://127.0.0.1:8866 — only this computer can
# reach it. Each page visit starts its own kernel (0.4–0.95 GB: Keras, a model, the last upload);
# closing or reloading the page shuts it down, and a kernel left without a page (a crashed browser, a
# laptop put to sleep) is culled after 10 minutes idle. The settings also raise the websocket message
# limit from Tornado's 10 MB to the app's 200 MB upload limit; with a bare `voila notebooks/app.ipynb`
# a larger upload (a DICOM series, an uncompressed NIfTI) is silently dropped by the server, and every
# kernel lives until the server stops. The notebook also runs as an ordinary notebook in JupyterLab.
#
# **How it works.** The cells of this notebook only wire widgets to `strokekit.app`, where the logic
# lives and is unit-tested: `list_models` / `default_model` / `load_model_for_app` (models only from
# the runs folder, loaded in Keras safe mode), `handle_upload` (checks each file's name, size, type by
# extension *and* content, reads it in a private folder under `runs/` that is deleted straight after,
# segments, and returns a message instead of raising), `with_geometry` / `describe_result` /
# `slice_text` / `summary_rows` (the status line, the panel and the table, from the same numbers),
# `mask_to_png_bytes` / `mask_to_nifti_bytes` for the download link (nothing is written to disk), and
# `status_html` / `result_table_html` / `mask_download_html` / `view_3d_png`, which turn them into the
# HTML and pictures the widgets show. A stack opens on the slice with the most predicted lesion *inside
# the brain* (`focus_slice`): a model's false positives sit mostly outside it, at the skull base or
# on the head rest. PNG and JPEG files carry no pixel size: type it to get mm², and a slice spacing for
# mL and the 3-D view when you upload several slices of one scan; the panel says which values it uses
# and where they come from, and a new upload clears typed values.
#
# **Models.** The list shows the run folders under the runs folder that the app can apply, each with
# what it was trained on and what it scored on which data: the phantom models of notebooks 04–06 and
# 09 (a binary slice model and its `config.json`), and few-shot CT recipes that notebook 10 saves
# with `strokekit.fewshot.save_fitted` when the CT-ICH slices are present (the whole recipe is
# applied: input channels, flips, restriction to the brain, its tuned threshold, and on a scan of several
# slices only the lesions brighter than the brain around them, `fewshot.keep_bright_components`). Notebook 07's
# multiclass and notebook 08's perfusion runs are not listed. The model picked first is the best
# *for CT*: the few-shot run with the best test Dice on CT patients, else the phantom model with the
# best validation Dice — a phantom model finds phantom lesions, not real ones. If there is no model,
# the button trains a small demo model on the phantom; outside Voila (JupyterLab, CI) the next cell
# trains it by itself (the same short run) and checks that it finds the phantom's lesions, so that the
# self-test below has a model that learned.

# %%
if AUTO_DEMO:                           # headless: (re)train the demo model and check that it learned
    on_demo(demo_btn)
    demo_dice = RunFolder.open(DEMO_RUN).metrics["dice"]
    print(f"demo model: validation Dice {demo_dice:.3f} on the phantom")
    assert not CHECK_LEARNING or demo_dice >= 0.5                # it finds the phantom lesion (quick profile floor)
    report.record(demo_val_dice=demo_dice)
if not IN_VOILA:
    print(f"{len(model_dd.options)} model(s) in {RUNS}; selected: {model_dd.value}")
    assert state["model"] is not None

# %% [markdown]
# **Self-test without a browser.** A phantom slice saved as PNG goes through the same handler as a
# browser upload, and then through the dashboard itself (a pixel size typed for it is cleared by the
# next upload); a broken file must give a message, not a traceback.
# (`tests/test_app_browser.py` does the same in Chromium through Voila.) Skipped when served by Voila.

# %%
if not IN_VOILA:
    volume = make_volume(0, phantom_config(PROFILE))
    k = int(np.argmax(volume.lesion_area))
    slice_png = app.png_bytes(np.rint(window_hu(volume.hu[k], "brain") * 255).astype(np.uint8))
    result, message = app.handle_upload([("phantom_P01.png", slice_png)], state["model"],
                                        state["config"], work_dir=WORK_DIR)
    print(message)
    assert result is not None, message
    assert result["overlays"][0].shape == volume.hu[k].shape + (3,)
    assert result["mask"].shape == (1,) + volume.hu[k].shape and result["area_px"]["lesion"][0] >= 0

# %%
if not IN_VOILA:                                              # the same file through the dashboard
    on_files([("phantom_P01.png", slice_png)])
    print(re.sub("<[^>]+>", "", area.value))
    assert overlay.value[:8] == b"\x89PNG\r\n\x1a\n" and overlay.layout.display is None
    assert re.search(r"Lesion area:</b> \d+ px", area.value), area.value
    assert "download" in download.value and "data:image/png;base64," in download.value

# %%
if not IN_VOILA:
    pixel_mm.value = 0.5                                      # typed for this upload: mm² appear ...
    assert "mm²" in area.value and "typed above" in area.value and "mm²" in status.value, area.value
    on_files([("phantom_P01.png", slice_png)])                # ... and a new upload clears it
    assert pixel_mm.value == 0 and "mm² needs the pixel size" in area.value

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
# **Back →** [10 · What generalizes](10_what_generalizes.ipynb)
