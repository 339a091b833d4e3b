"""What a docs snippet may assume, on tiny models; run as a script, it runs snippets (tests/test_docs.py).

Snippets name real checkpoints and the objects a reader has at hand; here they get tiny stand-ins:
``from_pretrained`` of the pipeline classes returns a tiny pipeline of that family (its call gets the tiny
sizes it needs), and ``pipe``, ``model``/``dit``, ``plan``, ``path`` (a saved tiny DiT pipeline),
``noise``/``class_labels`` (numpy), ``plan.json`` and ``exported/`` (a tiny DiT export) exist.

    python -m tests.docs_prelude snippets.json outcomes.json

runs each snippet of ``snippets.json`` (``{name: code}``) in a fresh copy of these names and its own
working directory, and writes ``{name: null | traceback}``: one process and one set of tiny models for all.
"""

import os
from pathlib import Path

import diffusers
import numpy as np
import torch

import tcpass
from tests.conftest import make_dit
from tests.pipelines import CALL, build

FAMILIES = {
    "DiTPipeline": "dit",
    "PixArtAlphaPipeline": "pixart_alpha",
    "PixArtSigmaPipeline": "pixart_sigma",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}


def tiny_pipeline(family: str):
    """A tiny pipeline of ``family`` whose call defaults to the tiny sizes it needs."""
    pipe = build(family)
    defaults = {**CALL.get(family, {}), **({} if family == "dit" else {"height": 8, "width": 8})}
    base = type(pipe)

    class Tiny(base):
        def __call__(self, *args, **kwargs):
            return base.__call__(self, *args, **{**defaults, **kwargs})

    Tiny.__name__ = Tiny.__qualname__ = base.__name__
    pipe.__class__ = Tiny
    return pipe


def _from_pretrained(cls, name=None, *args, **kwargs):
    if name is not None and Path(str(name)).is_dir():  # a directory the snippet saved: load it for real
        return _real_from_pretrained[cls.__name__](name, *args, **kwargs)
    pipe = tiny_pipeline(FAMILIES.get(cls.__name__, "dit"))
    return pipe.to(kwargs["torch_dtype"]) if isinstance(kwargs.get("torch_dtype"), torch.dtype) else pipe


_real_from_pretrained = {}
for _name in (*FAMILIES, "DiffusionPipeline"):
    _cls = getattr(diffusers, _name)
    _real_from_pretrained[_name] = _cls.from_pretrained
    _cls.from_pretrained = classmethod(_from_pretrained)


def _fixtures() -> dict:
    """The names a snippet starts with, in the current directory."""
    names = {"tcpass": tcpass, "torch": torch, "np": np}
    names.update(pipe=tiny_pipeline("dit"), model=make_dit(), dit=make_dit(), plan=tcpass.CachePlan())
    build("dit").save_pretrained("tiny-dit-pipeline")
    tcpass.save_plan(tcpass.CachePlan(), "plan.json")
    names.update(path="tiny-dit-pipeline", class_labels=np.array([3]))
    names["noise"] = np.random.default_rng(0).standard_normal((1, 4, 16, 16)).astype(np.float32)
    return names


def run_snippets(snippets: dict[str, str]) -> dict[str, str | None]:
    """Each snippet in its own directory with fresh fixtures: ``{name: None or its traceback}``."""
    import tempfile
    import traceback

    from tcpass.export.onnx_export import export_onnx

    outcomes = {}
    start = os.getcwd()
    for name, code in snippets.items():
        os.chdir(tempfile.mkdtemp(prefix="snippet-"))
        try:
            namespace = _fixtures()
            if "exported/" in code:
                export_onnx(tcpass.transform(make_dit(), tcpass.CachePlan()), "exported/")
            exec(compile(code, name, "exec"), namespace)
            outcomes[name] = None
        except BaseException:  # noqa: BLE001 - every failure is reported, with its traceback
            outcomes[name] = traceback.format_exc()
        finally:
            os.chdir(start)
    return outcomes


if __name__ == "__main__":
    import json
    import sys

    snippets_file, outcomes_file = sys.argv[1:3]
    Path(outcomes_file).write_text(json.dumps(run_snippets(json.loads(Path(snippets_file).read_text()))))
