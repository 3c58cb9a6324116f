"""A few minutes of CPU training on real CT (CT-ICH) against an all-background predictor, on held-out patients.

    python benchmarks/bench_ctich_train.py [--seeds 0 1 2] [--epochs 8] [--size 128] [--data PATH]

CT-ICH (PhysioNet, CC BY 4.0; ``../shared/data/ct-ich``) is *traumatic intracranial haemorrhage*,
not ischemic stroke. For each seed: the 36 patients with a lesion are split by patient
(``strokekit.split.random_split``, grouped: no patient in two subsets) into about 70 % train,
10 % validation, 20 % test; every lesion slice of those patients is used (``--free-ratio``
adds lesion-free slices of the same patients). The kit's training config
(``strokekit.config.TrainConfig``: U-Net 16→128 filters, BCE+Dice, the study's augmentation) with
batch normalisation is trained for ``--epochs`` epochs, the best epoch chosen by validation loss,
then scored on the test patients' lesion slices at threshold 0.5:

* per-patient Dice (each patient's pixels pooled, then the mean over patients; the headline),
* per-slice Dice (mean over lesion slices), pooled Dice, sensitivity, specificity;
* the same for an all-background prediction (Dice 0 by definition, specificity 1.0).

Prints one row per seed and the mean ± sd over seeds. A benchmark, not a test: the figures
depend on the machine and on what else runs on it (the load is printed).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

import numpy as np  # noqa: E402


def lesion_patients_with_free_slices(data, seed: int, free_ratio: float = 1.0):
    """Every lesion slice of the lesion patients, plus ``free_ratio`` times as many of their lesion-free slices."""
    has = data.has_lesion()
    patients = sorted({p for p, h in zip(data.patient_ids, has) if h})
    of_patients = np.isin(np.asarray(data.patient_ids), patients)
    lesion = np.flatnonzero(of_patients & has)
    free = np.flatnonzero(of_patients & ~has)
    rng = np.random.default_rng(seed)
    free = rng.choice(free, size=min(len(free), int(round(free_ratio * len(lesion)))), replace=False)
    return data.subset(np.sort(np.concatenate([lesion, free])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--free-ratio", type=float, default=0.0,
                        help="lesion-free slices added per lesion slice (same patients)")
    parser.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, default=True,
                        help="U-Net with batch normalisation (without it, 8 epochs stay at all-background)")
    parser.add_argument("--loss", default="bce_dice", help="a name in strokekit.losses.LOSSES")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--data", default=None, help="the ct-ich folder (default: ../shared/data/ct-ich)")
    args = parser.parse_args()

    import keras

    from strokekit import io
    from strokekit.metrics import aggregate
    from strokekit.split import random_split
    from strokekit.train import TrainConfig, predict_numpy, to_arrays, train

    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M} · {platform.node()} · {os.cpu_count()} CPUs · "
          f"keras {keras.__version__} ({keras.backend.backend()}) · load {os.getloadavg()[0]:.1f}")
    start = time.perf_counter()
    data = io.load_ctich(args.data, image_size=args.size, progress=False)
    print(f"CT-ICH (traumatic haemorrhage, not stroke): {len(data)} slices of "
          f"{len(data.patients())} patients loaded in {time.perf_counter() - start:.0f} s")

    rows = []
    for seed in args.seeds:
        subset = lesion_patients_with_free_slices(data, seed, args.free_ratio)
        split = random_split(subset, test=0.2, val=0.1, seed=seed, group_by_patient=True)
        train_set, val_set, test_set = (split.dataset(subset, s) for s in ("train", "val", "test"))
        test_set = test_set.subset(np.flatnonzero(test_set.has_lesion()))
        config = TrainConfig(image_size=args.size, num_epochs=args.epochs, seed=seed,
                             batch_norm=args.batch_norm, loss=args.loss, learning_rate=args.lr,
                             early_stopping_patience=0, workers=2)
        result = train(config, train_set, val_set, run_dir=False, progress=False, previews=False)
        x_test, y_test = to_arrays(config, test_set)
        prob = predict_numpy(result.model, x_test)[..., 0]
        table = aggregate(y_test > 0, prob, test_set.patient_ids, threshold=config.threshold)
        background = aggregate(y_test > 0, np.zeros_like(prob), test_set.patient_ids)
        row = {
            "seed": seed,
            "train/val/test patients": "/".join(str(len(s.patients())) for s in (train_set, val_set, test_set)),
            "train slices": len(train_set),
            "test slices": len(test_set),
            "per-patient Dice": table.loc["dice", "mean_of_patients"],
            "per-slice Dice": table.loc["dice", "mean_of_lesion_slices"],
            "pooled Dice": table.loc["dice", "pooled"],
            "sensitivity": table.loc["sensitivity", "pooled"],
            "specificity": table.loc["specificity", "pooled"],
            "background per-patient Dice": background.loc["dice", "mean_of_patients"],
            "train s": result.seconds,
            "images/s": result.images_per_second,
            "best epoch": int(result.metrics["best_epoch"]),
        }
        rows.append(row)
        print(" · ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
              flush=True)

    print(f"\n{len(rows)} seed(s), {args.epochs} epochs at {args.size} px, batch norm {args.batch_norm}, "
          f"loss {args.loss}, lr {args.lr}, free ratio {args.free_ratio}; load {os.getloadavg()[0]:.1f}:")
    for key in ("per-patient Dice", "per-slice Dice", "pooled Dice", "sensitivity", "specificity",
                "background per-patient Dice", "train s", "images/s"):
        values = np.array([r[key] for r in rows], dtype=float)
        print(f"  {key:28s} {values.mean():.3f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.3f}")


if __name__ == "__main__":
    main()
