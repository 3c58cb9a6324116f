"""Throughput of paired augmentation (strokekit.augment) in slices per second.

Usage: python benchmarks/bench_augment.py [--sizes 128 256] [--slices 200] [--threads 2]

Prints one line per image size and configuration: one thread, and ``--threads`` threads
working on separate slices the way ``SegmentationLoader``'s workers do. The numbers depend on
the machine and on what else runs on it; they are for comparison, not for tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import ndimage

from strokekit import augment as A


def make_slices(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random images in [0, 1] with a blob mask each (content does not change the cost)."""
    rng = np.random.default_rng(seed)
    images = ndimage.gaussian_filter(rng.random((n, size, size)), (0, 3, 3)).astype(np.float32)
    images = (images - images.min()) / (images.max() - images.min())
    masks = (images > np.quantile(images, 0.9)).astype(np.uint8)
    return images, masks


def rate(images: np.ndarray, masks: np.ndarray, config: A.AugmentConfig, threads: int) -> float:
    def work(i: int) -> None:
        A.augment_pair(images[i], masks[i], config, A.sample_rng(0, 0, i))

    work(0)  # warm up imports and caches
    start = time.perf_counter()
    if threads == 1:
        for i in range(len(images)):
            work(i)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(work, range(len(images))))
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    configs = {
        "STUDY_AUGMENT": A.STUDY_AUGMENT,
        "STUDY + elastic + intensity": dataclasses.replace(
            A.STUDY_AUGMENT, elastic_alpha=6.0, contrast=0.2, gamma=0.2, noise=0.02, blur=1.0
        ),
    }
    print(f"{'size':>5}  {'config':<28} {'1 thread':>12} {f'{args.threads} threads':>12}")
    for size in args.sizes:
        images, masks = make_slices(args.slices, size)
        for name, config in configs.items():
            one = rate(images, masks, config, 1)
            many = rate(images, masks, config, args.threads)
            print(f"{size:>5}  {name:<28} {one:>8.0f} sl/s {many:>8.0f} sl/s")


if __name__ == "__main__":
    main()
