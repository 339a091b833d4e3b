"""Step-specialized ONNX export (`onnx_export`) and the torch-free ONNX Runtime TPRR runtime (`ort_runtime`).

Both need the ``onnx`` extra; this module itself imports neither torch nor onnx.
"""

from __future__ import annotations

# The opsets the dynamo exporter writes natively (torch's torchlib starts at 18; onnxscript 0.7's
# version converter reaches 25). Below 18 it silently falls back to 18 or fails in conversion.
OPSETS = range(18, 26)
ONNX_EXTRA = 'pip install "tcpass[onnx]" (from a checkout: pip install -e ".[onnx]")'


def missing_extra(error: ImportError) -> ImportError:
    """``error`` (a missing onnx / onnxscript / onnxruntime) restated with the install command."""
    return ImportError(f"tcpass's ONNX export and runtime need the onnx extra ({error.name} is missing): {ONNX_EXTRA}")
