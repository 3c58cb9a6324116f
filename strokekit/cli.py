"""Command-line entry points: ``python -m strokekit <command>`` (or the ``strokekit`` script).

Commands are looked up in a registry, never evaluated from strings.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

from .errors import DataError


def _cmd_phantom(args: argparse.Namespace) -> int:
    from .config import get_profile
    from .io import write_study_layout
    from .phantom import PhantomConfig, generate_phantom

    profile = get_profile(args.profile)
    config = PhantomConfig(
        n_patients=args.patients or profile.phantom_patients,
        slices_per_patient=profile.phantom_slices_per_patient,
        image_size=args.size or profile.phantom_size,
        seed=args.seed,
    )
    start = time.perf_counter()
    dataset = generate_phantom(config, progress=not args.quiet)
    folder = write_study_layout(dataset, args.out, overwrite=True)
    print(f"phantom: {len(dataset)} slices of {len(dataset.patients())} patients "
          f"({config.image_size} px, seed {config.seed}) written to {folder} "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


def _cmd_run_notebooks(args: argparse.Namespace) -> int:
    from .runner import SUMMARY_NAME, find_notebooks, run_notebooks

    notebooks = [Path(p) for p in args.notebooks] or find_notebooks()
    if not notebooks:
        print("no notebooks found", file=sys.stderr)
        return 2
    from .config import get_profile

    # --profile, else $STROKEKIT_PROFILE, else quick (so `STROKEKIT_PROFILE=full make run` runs the full profile)
    results = run_notebooks(notebooks, args.out, profile=get_profile(args.profile).name,
                            timeout=args.timeout, parallel=args.parallel)
    width = max(len("notebook"), *(len(r["notebook"]) for r in results))
    print(f"\n{'notebook':<{width}}  status  seconds  figures")
    for r in results:
        figures = " ".join(f"{k}={_figure_text(v)}" for k, v in r["figures"].items())
        status = "ok" if r["ok"] else "FAILED"
        print(f"{r['notebook']:<{width}}  {status:<6}  {r['seconds']:7.1f}  {figures}".rstrip())
        if not r["ok"]:
            print(f"{'':<{width}}  {r['error']}")
    out = Path(args.out).resolve()
    print(f"executed notebooks: {out}/*.ipynb\nHTML:               {out}/*.html\n"
          f"summary:            {out / SUMMARY_NAME}")
    return 0 if all(r["ok"] for r in results) else 1


def _figure_text(value) -> str:
    """A recorded figure for the table: floats to 4 significant digits, the rest as they are."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _load_data(path: str | None, profile_name: str | None):
    """A dataset from a folder (any layout strokekit.io reads) or, without one, the phantom."""
    from .config import get_profile

    if path:
        from .io import load_dataset

        return load_dataset(path, progress=False)
    from .phantom import PhantomConfig, generate_phantom

    profile = get_profile(profile_name)
    return generate_phantom(PhantomConfig(n_patients=profile.phantom_patients,
                                          slices_per_patient=profile.phantom_slices_per_patient,
                                          image_size=profile.phantom_size), progress=False)


def _cmd_train(args: argparse.Namespace) -> int:
    import dataclasses

    from .config import get_profile
    from .split import Split, check_leakage, load_or_make_split
    from .train import train

    profile = get_profile(args.profile)
    data = _load_data(args.data, args.profile)
    if args.split:
        split = Split.load(args.split)
    else:
        split = load_or_make_split(data, None, seed=args.seed)
    check_leakage(split)
    config = dataclasses.replace(
        profile.train_config(),
        arch=args.model, activation=args.activation, seed=args.seed, loss=args.loss,
        **{k: v for k, v in (("num_epochs", args.epochs), ("image_size", args.image_size),
                             ("learning_rate", args.learning_rate),
                             ("batch_size", args.batch_size)) if v},
    )
    result = train(config, split.dataset(data, "train"), split.dataset(data, "val"),
                   run_dir=args.out, split=split, progress=not args.quiet, overwrite=args.overwrite,
                   resume=args.resume)
    print(f"run folder: {result.run_dir}")
    print("validation: " + ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()
                                     if isinstance(v, float)))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .io import load_dataset
    from .metrics import aggregate, segmentation_report
    from .runs import RunFolder
    from .train import TrainConfig, config_from_dict, load_model, predict_numpy, to_arrays

    path = Path(args.model)
    if path.is_dir():
        run = RunFolder.open(path)
    elif (path.parent / "config.json").is_file():  # a .keras file inside a run folder
        run = RunFolder.open(path.parent)
    else:
        run = None
    if run is not None and run.kind != "binary":
        print(f"evaluate handles binary slice models; {run.folder} is a {run.kind} run", file=sys.stderr)
        return 2
    model = load_model(args.model)
    if run is not None:
        config = config_from_dict(run.config)
    else:
        shape = model.input_shape
        config = TrainConfig(image_size=int(shape[1]), windows=("brain",) * int(shape[-1]))
    if config.num_classes != 1:
        print(f"evaluate handles binary (sigmoid) models; this one has {config.num_classes} "
              "classes (use strokekit.metrics.per_class_metrics)", file=sys.stderr)
        return 2
    data = load_dataset(args.data, progress=False)
    x, y = to_arrays(config, data)
    prob = predict_numpy(model, x)[..., 0]
    threshold = args.threshold if args.threshold is not None else config.threshold
    report = segmentation_report(y, prob, case_ids=data.case_ids, patient_ids=data.patient_ids,
                                 threshold=threshold, surface=False, progress=False)
    levels = aggregate(y, prob, patient_ids=data.patient_ids, threshold=threshold)
    columns = [c for c in ("case_id", "patient_id", "dice", "iou", "sensitivity", "specificity",
                           "precision") if c in report.columns]
    print(report[columns].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print()
    print(levels.to_string(float_format=lambda v: f"{v:.4f}") if hasattr(levels, "to_string")
          else levels)
    if args.csv:
        report.to_csv(args.csv, index=False)
        print(f"per-slice table written to {args.csv}")
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "phantom": (_cmd_phantom, "generate the synthetic head-CT phantom in the study's file layout"),
    "run-notebooks": (_cmd_run_notebooks, "execute the notebooks headless into a build folder"),
    "train": (_cmd_train, "train a model on a config (mirrors the study's training script)"),
    "evaluate": (_cmd_evaluate, "evaluate a saved model on a folder of slices and print the table"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="strokekit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("phantom", help=COMMANDS["phantom"][1])
    p.add_argument("--out", default="data/phantom", help="output folder (default: data/phantom)")
    p.add_argument("--profile", default=None,
                   help="quick or full (default: $STROKEKIT_PROFILE or quick)")
    p.add_argument("--patients", type=int, default=None)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p = sub.add_parser("run-notebooks", help=COMMANDS["run-notebooks"][1])
    p.add_argument("notebooks", nargs="*", help="notebooks to run (default: notebooks/NN_*.ipynb)")
    p.add_argument("--out", default="build/notebooks")
    p.add_argument("--profile", default=None)
    p.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    p.add_argument("--parallel", action="store_true",
                   help="run the two chains of strokekit.runner.CHAINS at the same time")
    p = sub.add_parser("train", help=COMMANDS["train"][1])
    p.add_argument("--model", default="unet", help="architecture: unet, resunet, ...")
    p.add_argument("--activation", default="leaky_relu")
    p.add_argument("--loss", default="bce_dice")
    p.add_argument("--epochs", type=int, default=None, help="default: the profile's")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--learning-rate", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None, help="data folder (default: the phantom)")
    p.add_argument("--split", default=None, help="split file (default: a cluster split made now)")
    p.add_argument("--out", default=None,
                   help="run folder (default: runs/<arch>-<activation>-s<seed>-<time>)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out from the end of its last epoch")
    p.add_argument("--profile", default=None)
    p.add_argument("--quiet", action="store_true")
    p = sub.add_parser("evaluate", help=COMMANDS["evaluate"][1])
    p.add_argument("--model", required=True, help="a run folder or a .keras file")
    p.add_argument("--data", required=True,
                   help="folder of slices with masks (any layout strokekit.io reads)")
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--csv", default=None, help="also write the per-slice table here")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; bad data, a damaged model or a run folder already in use is one line on
    stderr and exit code 2.

    Those are the user's to fix, so the message says what is wrong and where (a
    :class:`~strokekit.errors.DataError`, e.g. from the readers or ``load_model``, or the
    ``FileExistsError`` of ``train --out`` into a folder that holds a run); any other
    exception is a bug in the kit and keeps its traceback.
    """
    args = build_parser().parse_args(argv)
    handler, _ = COMMANDS[args.command]
    try:
        return handler(args)
    except (DataError, FileExistsError) as exc:
        message = " ".join(str(exc).split())
        print(f"strokekit {args.command}: error: {message}", file=sys.stderr)
        return 2
