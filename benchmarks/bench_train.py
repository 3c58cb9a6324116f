"""Training throughput (images/s) and peak memory per architecture at 128 and 256 px on this machine,
and the batch loader against pre-loaded arrays (the limit). Prints a table; not a test.

    python benchmarks/bench_train.py [--sizes 128 256] [--steps 20] [--archs slim_unet slim_resunet]
"""

from __future__ import annotations

import argparse
import os
import resource
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

import numpy as np  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--archs", nargs="+", default=["slim_unet", "slim_resunet"])
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per case")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    import keras

    from strokekit import models
    from strokekit.augment import STUDY_AUGMENT, SegmentationLoader
    from strokekit.config import seed_everything
    from strokekit.losses import get_loss

    print(f"keras {keras.__version__} · backend {keras.backend.backend()} · {os.cpu_count()} CPUs · "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"{'model':<14} {'px':>4} {'params':>10} {'feed':<8} {'images/s':>9} {'peak RSS MB':>12}")
    rng = np.random.default_rng(0)
    for size in args.sizes:
        n = args.batch_size * 4
        x = rng.random((n, size, size, 1), dtype=np.float32)
        y = (rng.random((n, size, size)) > 0.97).astype(np.uint8)
        for arch in args.archs:
            seed_everything(0)
            model = models.build_preset(arch, input_shape=(size, size, 1))
            model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=get_loss("bce_dice"))
            for feed in ("arrays", "loader"):
                if feed == "arrays":
                    data = dict(x=x, y=y[..., None].astype(np.float32), batch_size=args.batch_size)
                else:
                    data = dict(x=SegmentationLoader(x, y, batch_size=args.batch_size, augment=STUDY_AUGMENT,
                                                     seed=0, workers=2))
                model.fit(**data, epochs=1, steps_per_epoch=2, verbose=0)  # warm-up: tracing
                epochs = max(1, args.steps // 4)
                start = time.perf_counter()
                model.fit(**data, epochs=epochs, steps_per_epoch=4, verbose=0)
                seconds = time.perf_counter() - start
                rate = epochs * 4 * args.batch_size / seconds
                print(f"{arch:<14} {size:>4} {models.count_params(model):>10,d} {feed:<8} {rate:>9.1f} "
                      f"{peak_rss_mb():>12.0f}")


if __name__ == "__main__":
    main()
