"""tcpass: TokenCache for diffusion transformers, as a compiler pass.

import tcpass
pipe.transformer = tcpass.transform(pipe.transformer, tcpass.CachePlan())
"""

from tcpass.plan import CachePlan, ModelFingerprint, SelectorSpec, TPRRSchedule, load_plan, save_plan
from tcpass.runtime import TokenCacheTransformer, transform
from tcpass.schedule import StepKind

__all__ = [
    "CachePlan",
    "ModelFingerprint",
    "SelectorSpec",
    "StepKind",
    "TPRRSchedule",
    "TokenCacheTransformer",
    "load_plan",
    "save_plan",
    "transform",
]
__version__ = "0.1.0"
