"""Importing this module registers the built-in augmenter families."""

from recaug.augmenters import kar, llmrec, once  # noqa: F401
