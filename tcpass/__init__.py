"""tcpass: TokenCache for diffusion transformers, as a compiler pass.

    import tcpass
    pipe.transformer = tcpass.transform(pipe.transformer, tcpass.CachePlan())

Importing ``tcpass`` itself does not import torch (plans and schedules are plain Python), so the
ONNX Runtime deployment (`tcpass.export.ort_runtime`) runs with numpy and onnxruntime alone.
"""

from tcpass.plan import (
    CachePlan,
    ForecastSpec,
    ModelFingerprint,
    SelectorSpec,
    SkipRule,
    StepSkip,
    TPRRSchedule,
    load_plan,
    register_skip_rule,
    save_plan,
)
from tcpass.schedule import StepKind

__all__ = [
    "CachePlan",
    "ForecastSpec",
    "ModelFingerprint",
    "SelectorSpec",
    "SkipRule",
    "StepKind",
    "StepSkip",
    "TPRRSchedule",
    "TokenCacheTransformer",
    "load_plan",
    "register_skip_rule",
    "save_plan",
    "transform",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("transform", "TokenCacheTransformer"):
        from tcpass import torch_runtime

        return getattr(torch_runtime, name)
    raise AttributeError(f"module 'tcpass' has no attribute {name!r}")
