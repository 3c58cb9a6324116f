"""Time the app's path from uploaded bytes to overlays on CPU, and the 3-D view.

Prints, for a small U-Net (128 px input, TrainConfig's default filters, untrained: the weights do
not change the time):

* one 512 x 512 PNG slice (a CT-ICH slice when ../shared/data/ct-ich is present, else a phantom
  slice), uploaded as bytes;
* a 40-slice volume: a phantom patient resized to 512 x 512, uploaded as .nii.gz bytes;
* a CT-ICH patient uploaded as its PNG slices, when the data is present;
* plot_3d of a 24 x 256 x 256 phantom volume (brain, skull, lesion, reference) drawn to PNG.

Each upload is timed cold (first call: graph tracing) and then warm (median of 3), split into
reading (checks, temporary files, decoding), prediction, and post-processing (threshold, areas,
volume, overlays).

The model is untrained, so the lesion sizes printed are meaningless: the figures are times.

Run: ``.venv/bin/python benchmarks/bench_app.py`` (one to two minutes on 2 CPU cores).
"""

from __future__ import annotations

import gzip
import io
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # CPU timings, even on a GPU machine
os.environ.setdefault("MPLBACKEND", "Agg")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def phantom_volume_nifti(n_slices: int = 40, size: int = 512) -> tuple[bytes, tuple[int, int, int]]:
    import nibabel as nib

    from strokekit.phantom import PhantomConfig, make_volume
    from strokekit.preprocess import resize_image

    config = PhantomConfig(image_size=256, n_slices=n_slices)
    volume = make_volume(0, config)
    hu = np.stack([resize_image(s, size) for s in volume.hu])
    spacing = volume.spacing[0] * 256 / size
    stored = np.moveaxis(np.rint(hu).astype(np.int16), 0, 2)  # (H, W, D), read back along axis 2
    image = nib.Nifti1Image(stored, np.diag([spacing, spacing, volume.slice_thickness, 1.0]))
    image.header.set_zooms((spacing, spacing, volume.slice_thickness))
    return gzip.compress(image.to_bytes(), compresslevel=6), hu.shape


def time_upload(files, model, config, repeats: int = 3) -> dict[str, float]:
    from strokekit.app import handle_upload

    runs = []
    for k in range(repeats + 1):
        start = time.perf_counter()
        result, message = handle_upload(files, model, config)
        total = time.perf_counter() - start
        if result is None:
            raise SystemExit(f"upload failed: {message}")
        predict = result["timing"]["predict_s"]
        post = result["timing"]["postprocess_s"]
        runs.append(
            {"total": total, "read": total - result["seconds"], "predict": predict, "post": post}
        )
    cold, warm = runs[0], runs[1:]
    out = {f"warm_{key}": statistics.median(r[key] for r in warm) for key in warm[0]}
    out["cold_total"] = cold["total"]
    out["message"] = message
    return out


def report(title: str, nbytes: int, t: dict) -> None:
    print(f"\n{title}  ({nbytes / 1e6:.2f} MB uploaded)")
    print(f"  {t['message']}")
    print(
        f"  warm: total {t['warm_total']:.2f} s = read {t['warm_read']:.2f} + predict "
        f"{t['warm_predict']:.2f} + post-process {t['warm_post']:.2f};  cold first call {t['cold_total']:.2f} s"
    )


def main() -> None:
    import keras

    from strokekit.models import unet
    from strokekit.paths import ctich_dir
    from strokekit.train import TrainConfig

    config = TrainConfig(image_size=128)
    model = unet(input_shape=(128, 128, 1), filters=config.filters, seed=0)
    print(
        f"keras {keras.__version__} ({keras.backend.backend()}), CPU, {os.cpu_count()} cores; "
        f"U-Net filters {config.filters}, {model.count_params():,} parameters, input 128 px"
    )

    ctich = ctich_dir()
    if ctich is not None:
        png = (ctich / "image" / "0.png").read_bytes()
        name, what = "ctich_0.png", "CT-ICH slice 0.png"
    else:
        from strokekit.phantom import PhantomConfig, make_volume
        from strokekit.preprocess import window_hu

        vol = make_volume(0, PhantomConfig(image_size=512, n_slices=12))
        png = png_bytes(np.rint(window_hu(vol.hu[6], (40, 120)) * 255).astype(np.uint8))
        name, what = "phantom.png", "phantom slice"
    report(f"one 512x512 PNG slice ({what})", len(png), time_upload([(name, png)], model, config))

    nifti, shape = phantom_volume_nifti()
    report(
        f"{shape[0]}-slice phantom volume {shape[1]}x{shape[2]} as .nii.gz",
        len(nifti),
        time_upload([("phantom.nii.gz", nifti)], model, config),
    )

    if ctich is not None:
        import pandas as pd

        table = pd.read_csv(ctich / "slices.csv", dtype={"file": str, "patient_id": str})
        rows = table[table["patient_id"] == "49"].sort_values("slice_index_in_volume")
        files = [
            (f"p49_{int(i):03d}.png", (ctich / "image" / f).read_bytes())
            for f, i in zip(rows["file"], rows["slice_index_in_volume"])
        ]
        report(
            f"CT-ICH patient 49: {len(files)} PNG slices 512x512",
            sum(len(c) for _, c in files),
            time_upload(files, model, config, repeats=2),
        )

    from strokekit.phantom import PhantomConfig, make_volume
    from strokekit.recon3d import plot_3d, skull_from_hu

    vol = make_volume(0, PhantomConfig(image_size=256, n_slices=24))
    spacing = (vol.slice_thickness, *vol.spacing)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fig = plot_3d(
            vol.labels > 0,
            spacing,
            brain_mask=vol.brain,
            skull_mask=skull_from_hu(vol.hu),
            truth_mask=vol.labels > 0,
        )
        fig.savefig(io.BytesIO(), format="png", dpi=80)
        times.append(time.perf_counter() - start)
    print(
        f"\nplot_3d 24x256x256 (brain, skull, lesion, reference) built and drawn to PNG: "
        f"median {statistics.median(times):.2f} s (first {times[0]:.2f} s)"
    )


if __name__ == "__main__":
    main()
