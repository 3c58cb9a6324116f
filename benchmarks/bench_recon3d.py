"""Notebook 09's slice model on whole held-out phantom scans: 3-D Dice and volume error by size and seed.

Trains the quick profile's U-Net (notebook 09's recipe) on the course split at each image size and
seed, predicts every slice of the phantom patients the course never contains (P13-P18), cleans the
stacked mask as notebook 09 does and prints one row per (size, seed, patient), then the mean ± sd
over seeds. Run: ``python benchmarks/bench_recon3d.py [--sizes 64 96 128] [--seeds 5]`` (about
25 s per run on 2 CPU cores). Results are logged in ``benchmarks/recon3d_log.md``.
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pandas as pd  # noqa: E402

from strokekit import paths, recon3d, train  # noqa: E402
from strokekit import split as splitting  # noqa: E402
from strokekit.augment import STUDY_AUGMENT  # noqa: E402
from strokekit.config import get_profile, phantom_config  # noqa: E402
from strokekit.phantom import generate_phantom, make_volume  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--patients", type=int, default=6, help="held-out patients from the first one")
    args = parser.parse_args()
    profile = get_profile("quick")
    phantom = phantom_config(profile)
    data = generate_phantom(phantom, progress=False)
    split = splitting.load_or_make_split(data, paths.data_dir() / "splits" / "phantom_split.json", seed=0)
    volumes = [make_volume(phantom.n_patients + k, phantom) for k in range(args.patients)]
    rows = []
    for size in args.sizes:
        for seed in range(args.seeds):
            config = profile.train_config(arch="unet", loss="bce_dice", augment=STUDY_AUGMENT,
                                          preview_slices=0, image_size=size, seed=seed)
            result = train.train(config, split.dataset(data, "train"), split.dataset(data, "val"),
                                 run_dir=False, progress=False, previews=False)
            for volume in volumes:
                spacing = (volume.slice_thickness, *volume.spacing)
                prob = recon3d.predict_volume(result.model, volume.hu, config, progress=False)
                cleaned = recon3d.clean_mask(prob >= config.threshold, spacing=spacing, min_size_ml=0.05)
                report = recon3d.volume_report(cleaned, volume.labels > 0, spacing)
                rows.append({"size": size, "seed": seed, "patient": volume.patient_id,
                             "lesion": f"{volume.lesion_type} {volume.territory}",
                             "val_dice": result.metrics["dice"], "dice_3d": report["dice_3d"],
                             "volume_error": report["relative_difference"]})
                print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in rows[-1].items()), flush=True)
    table = pd.DataFrame(rows)
    first = volumes[0].patient_id
    summary = table.groupby(["size", "seed"]).agg(
        val_dice=("val_dice", "first"), mean_dice_3d=("dice_3d", "mean"))
    summary[f"{first}_dice_3d"] = table[table.patient == first].set_index(["size", "seed"])["dice_3d"]
    summary[f"{first}_volume_error"] = table[table.patient == first].set_index(["size", "seed"])["volume_error"]
    print(summary.round(3).to_string())
    print("\nmean ± sd over seeds")
    print(summary.groupby("size").agg(["mean", "std"]).round(3).to_string())


if __name__ == "__main__":
    main()
