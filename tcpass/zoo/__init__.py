"""The shipped reference model: a class-conditional DiT trained on real handwritten digits."""

from tcpass.zoo.digits import (
    NULL_LABEL,
    DigitsClassifier,
    digits_split,
    load_classifier,
    load_reference_model,
    reference_model_dir,
)

__all__ = [
    "NULL_LABEL",
    "DigitsClassifier",
    "digits_split",
    "load_classifier",
    "load_reference_model",
    "reference_model_dir",
]
