"""Fixtures shared by several test files."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_recipe():
    """A few-shot recipe with every part of the kit's default (crops, window and threshold-map channels, brain
    restriction, flips, tuned threshold) that fits in seconds on 16 px slices."""
    from strokekit import fewshot as fs
    from strokekit.train import TrainConfig

    return fs.FewShotRecipe(
        config=TrainConfig(image_size=16, filters=(4, 8), batch_norm=True, num_epochs=1, batch_size=4,
                           early_stopping_patience=0, reduce_lr_patience=0, workers=1),
        empty_ratio=1.0, patch_size=8, display_windows=((130.0, 230.0),), candidate_channel=True,
        restrict_to_brain=True, tta_flip=True, tune_threshold=True, thresholds=(0.3, 0.6))
