"""Cross-validation of a few-shot recipe on the training patients of ``fewshot-ctich-v1`` (never the test patients).

Usage:
    python benchmarks/cv_fewshot.py NAME [--seeds 0,1] [--config JSON] [--recipe JSON] [--backgrounds] [--out FILE]

``--config`` changes fields of ``FEWSHOT_DEFAULT.config`` (e.g. ``'{"filters": [16, 32, 64, 128]}'``), ``--recipe``
fields of the recipe itself (e.g. ``'{"context_slices": 1}'``); lists become tuples. For each seed: leave one of
patients 49/50/51 out (train on the other two and their lesion-free slices, validate on 66: best epoch by
validation loss, threshold tuned there), score the held-out patient's lesion slices; then fit on all three and score
patient 66. Probabilities of a 256 px model are resized to the protocol's 128 px masks, as the benchmark does.

``--backgrounds`` passes the even-indexed lesion-free patients to ``fit_recipe(backgrounds=)`` (for
``paste_per_slice``). Prints a line per fit and one ``RESULT`` JSON line per seed, appended to ``--out``: ``cv`` (mean
per-patient Dice of the three held-out patients at the threshold the recipe chose), ``folds``, ``thr``, ``val66``, the
same with the recipe's brightness floor (``cv_floor``, ``folds_floor``, ``val66_floor``: the recipe as applied) and, per
fit, Dice over a wide threshold list on the held-out and on the validation slices (``grid``, ``val_grid``:
after-training variants can be chosen from these without training again) and the same for test-time augmentation
over the 8 rotations and flips (``d8``, ``d8_val``). About 4-6 minutes per seed for the default on 2 CPU cores.

Recorded runs and the rule for taking a lever: ``benchmarks/fewshot_log.md``. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # 1.5-2x faster CPU training; must precede TensorFlow

import numpy as np

from strokekit import fewshot as fs
from strokekit.io import load_ctich
from strokekit.preprocess import resize_image
from strokekit.train import predict_numpy

GRID = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99)
HELD_OUT = ("49", "50", "51")


def _tuples(changes: dict) -> dict:
    return {k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
            for k, v in changes.items()}


def _d8(fitted: fs.FittedRecipe, data, size: int) -> np.ndarray:
    """Probabilities averaged over the 8 rotations and flips, restricted to the brain, at ``size``."""
    x, _, brains = fs._model_inputs(fitted.recipe, data, fitted.band)
    total = np.zeros(x.shape[:3])
    for k in range(4):
        for flip in (False, True):
            view = np.rot90(x, k, axes=(1, 2))
            view = view[:, :, ::-1] if flip else view
            p = predict_numpy(fitted.model, np.ascontiguousarray(view), 32)[..., 0]
            total += np.rot90(p[:, :, ::-1] if flip else p, -k, axes=(1, 2))
    return np.stack([resize_image(q.astype(np.float32), size) for q in total / 8 * brains])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--config", default="{}")
    parser.add_argument("--recipe", default="{}")
    parser.add_argument("--out", default="build/cv_fewshot.jsonl")
    parser.add_argument("--backgrounds", action="store_true",
                        help="pass the even-indexed lesion-free patients as fit_recipe(backgrounds=) "
                             "(notebook 10 measures false positives on the odd-indexed ones)")
    args = parser.parse_args()
    base = fs.FEWSHOT_DEFAULT
    recipe = dataclasses.replace(base, config=dataclasses.replace(base.config, **_tuples(json.loads(args.config))),
                                 **_tuples(json.loads(args.recipe)))
    size = fs.PROTOCOLS["fewshot-ctich-v1"]["image_size"]
    data, split = fs.load_protocol(image_size=recipe.config.image_size, progress=False)
    if recipe.context_slices:  # neighbours from the whole scans of the training and validation patients
        data = fs.attach_context(data, recipe.context_slices)
    small, _ = fs.load_protocol(image_size=size, progress=False)
    masks = dict(zip(small.case_ids, small.masks))
    train, val = split.dataset(data, "train"), split.dataset(data, "val")
    backgrounds = None
    if args.backgrounds:
        backgrounds = load_ctich(None, image_size=recipe.config.image_size,
                                 patients=fs.lesion_free_patients()[0::2], progress=False)
    pids = np.asarray(train.patient_ids).astype(str)

    def grid(prob, held) -> dict[float, float]:
        truth = np.stack([masks[c] for c in held.case_ids])
        return {t: fs._pp_dice(prob, truth, list(held.patient_ids), t) for t in GRID}

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    for seed in (int(s) for s in args.seeds.split(",")):
        rows = {}
        for out in (*HELD_OUT, "66"):
            started = time.perf_counter()
            if out == "66":
                held, fitted = val, fs.fit_recipe(recipe, train, val, seed=seed, backgrounds=backgrounds)
            else:
                held = train.subset(np.flatnonzero((pids == out) & fs.lesion_flags(train)))
                fitted = fs.fit_recipe(recipe, train.subset(np.flatnonzero(pids != out)), val, seed=seed,
                                       backgrounds=backgrounds)
            seconds = time.perf_counter() - started
            prob, _, floored = fs._predict_masks(fitted, held, size)  # floored: the recipe as applied
            held_grid = grid(prob, held)
            val_grid = grid(fs.predict_recipe(fitted, val, probabilities=True, output_size=size), val)
            truth = np.stack([masks[c] for c in held.case_ids])
            rows[out] = dict(thr=fitted.threshold, dice=fs._pp_dice(prob, truth, list(held.patient_ids),
                                                                   fitted.threshold),
                             dice_floor=fs._pp_dice(floored.astype(np.float32), truth, list(held.patient_ids), 0.5),
                             grid=held_grid, val_grid=val_grid, d8=grid(_d8(fitted, held, size), held),
                             d8_val=grid(_d8(fitted, val, size), val), seconds=round(seconds, 1))
            print(f"{args.name} seed {seed} {out}: threshold {fitted.threshold}, per-patient Dice "
                  f"{rows[out]['dice']:.3f} (with the floor {rows[out]['dice_floor']:.3f}), {seconds:.0f} s, "
                  f"{fitted.n_train} training slices", flush=True)
        line = dict(name=args.name, seed=seed, config=args.config, recipe=args.recipe,
                    cv=round(float(np.mean([rows[o]["dice"] for o in HELD_OUT])), 3),
                    folds=[round(rows[o]["dice"], 3) for o in HELD_OUT], thr=[rows[o]["thr"] for o in rows],
                    val66=round(rows["66"]["dice"], 3),
                    cv_floor=round(float(np.mean([rows[o]["dice_floor"] for o in HELD_OUT])), 3),
                    folds_floor=[round(rows[o]["dice_floor"], 3) for o in HELD_OUT],
                    val66_floor=round(rows["66"]["dice_floor"], 3), seconds=[rows[o]["seconds"] for o in rows],
                    finished=time.strftime("%Y-%m-%d %H:%M"))
        print("RESULT", json.dumps(line), flush=True)
        with open(args.out, "a") as fh:
            fh.write(json.dumps(dict(line, fits=rows)) + "\n")


if __name__ == "__main__":
    main()
