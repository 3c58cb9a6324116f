"""strokekit: helpers for a notebook course on few-shot stroke segmentation in brain CT.

Importing the package does nothing but define names: no printing, seeding, downloading or
training. Submodules that need Keras import it themselves, so ``import strokekit`` is cheap.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
