"""How fast VGG16 features are on this machine (strokekit.split.embed_vgg16, notebook 02).

Prints, for each image size, the forward-pass throughput (images/s, model already built) and the
end-to-end time of one ``embed_vgg16`` call (resize + preprocess + build + forward), with the
weights actually in use (ImageNet from the Keras cache, or the offline random fallback), the Keras
backend, the CPU count and the load average, so that figures from a busy machine can be told apart.

Usage::

    TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/bench_vgg16.py            # 224, 128 and 64 px
    python benchmarks/bench_vgg16.py --sizes 224 --num-images 64 --batch-size 16
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np


def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover - not on every platform
        return "n/a"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 128, 64])
    parser.add_argument("--num-images", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--weights", default="imagenet", help='"imagenet", "none" or a file')
    parser.add_argument("--repeats", type=int, default=2, help="timed passes; the best is kept")
    args = parser.parse_args(argv)

    import keras

    from strokekit.split import embed_vgg16

    weights = None if args.weights.lower() == "none" else args.weights
    rng = np.random.default_rng(0)
    images = rng.random((args.num_images, 256, 256), dtype=np.float32)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, info = embed_vgg16(
            images[:1], weights=weights, image_size=32, progress=False, return_info=True
        )
    for w in caught:
        if issubclass(w.category, UserWarning):
            print(f"warning: {w.message}")
    print(
        f"VGG16 weights: {info['weights']} | backend: {keras.backend.backend()} | "
        f"CPUs: {os.cpu_count()} | load average (1, 5, 15 min) before: {_load()}"
    )
    print(f"{args.num_images} images of 256x256 resized to each size, batch {args.batch_size}")
    print(f"{'size':>6} {'forward img/s':>14} {'call s':>8} {'call img/s':>11}")
    weights_arg = info["weights_path"]
    for size in args.sizes:
        model = keras.applications.VGG16(
            include_top=False, weights=weights_arg, input_shape=(size, size, 3), pooling="avg"
        )
        batch = rng.random((args.batch_size, size, size, 3), dtype=np.float32) * 255.0
        batch = keras.applications.vgg16.preprocess_input(batch)
        model.predict_on_batch(batch)  # trace/compile once, outside the timing
        n_batches = max(1, args.num_images // args.batch_size)
        forward = np.inf
        for _ in range(args.repeats):
            start = time.perf_counter()
            for _ in range(n_batches):
                model.predict_on_batch(batch)
            forward = min(forward, time.perf_counter() - start)
        call = np.inf
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the fallback was reported above
            for _ in range(args.repeats):
                start = time.perf_counter()
                embed_vgg16(
                    images,
                    weights=weights,
                    image_size=size,
                    batch_size=args.batch_size,
                    progress=False,
                )
                call = min(call, time.perf_counter() - start)
        rate = n_batches * args.batch_size / forward
        print(f"{size:>6} {rate:>14.1f} {call:>8.2f} {args.num_images / call:>11.1f}")
    print(f"load average after: {_load()}")


if __name__ == "__main__":
    main()
