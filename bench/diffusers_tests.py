"""diffusers' own pipeline fast tests, run with ``pipe.transformer`` replaced by a tcpass transformer.

What a new user tries first: take a pipeline's tests from the diffusers repository and swap in
``tcpass.transform(transformer, plan)``. This script copies ``tests/`` out of a diffusers git
snapshot (``--diffusers``: a git directory, e.g. what the library's ``fetch`` gives), adds a pytest
plugin that wraps every test class's ``get_dummy_components`` so the ``transformer`` it builds is
transformed (nothing else changes), and runs each family's test file three times: untouched,
with ``CachePlan.no_cache()`` and with the default ``CachePlan()``. It prints the counts and every
test that fails only under tcpass, and writes them to ``--out`` (JSON).

    python bench/diffusers_tests.py --diffusers /work/.mirror/huggingface+diffusers/repo

Needs the test dependencies diffusers' suite imports: ``pip install parameterized requests_mock peft accelerate``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path
from xml.etree import ElementTree

FAMILIES = {
    "dit": "tests/pipelines/dit/test_dit.py",
    "pixart_sigma": "tests/pipelines/pixart_sigma/test_pixart.py",
    "sd3": "tests/pipelines/stable_diffusion_3/test_pipeline_stable_diffusion_3.py",
    "flux": "tests/pipelines/flux/test_pipeline_flux.py",
    "wan": "tests/pipelines/wan/test_wan.py",
    "ltx": "tests/pipelines/ltx/test_ltx.py",
}
ARMS = ("plain", "no_cache", "default")

# The plugin pytest loads (``-p tcpass_swap``) when TCPASS_ARM is not "plain".
PLUGIN = """
import functools
import os

import tcpass
from tcpass.adapters import adapter_for

ARM = os.environ["TCPASS_ARM"]


def _plan():
    return tcpass.CachePlan.no_cache() if ARM == "no_cache" else tcpass.CachePlan()


def _wrap(cls):
    original = cls.get_dummy_components

    @functools.wraps(original)
    def get_dummy_components(self, *args, **kwargs):
        components = original(self, *args, **kwargs)
        model = components.get("transformer")
        if model is not None:
            adapter_for(model)  # a family tcpass does not support fails here, loudly
            components["transformer"] = tcpass.transform(model, _plan())
        return components

    cls.get_dummy_components = get_dummy_components
    cls._tcpass_swapped = True


def pytest_collection_modifyitems(session, config, items):
    for item in items:
        cls = getattr(item, "cls", None)
        if cls is not None and hasattr(cls, "get_dummy_components") and not getattr(cls, "_tcpass_swapped", False):
            _wrap(cls)
"""


# Loaded in every arm (``-p offline_hub``): the fast tests load tiny text encoders' configs and
# tokenizers from the Hugging Face hub, which this machine cannot reach. Those three ids are built
# here instead (a T5 config of the same width, a word-level tokenizer); everything else is untouched.
# Tests that compare with pixel values recorded from the hub's tokenizers fail in every arm alike.
HUB_PLUGIN = """
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

WORDS = ["<pad>", "<unk>", "</s>", "a", "painting", "of", "squirrel", "eating", "burger", "photo", "cat", "dog"]


def _tokenizer(max_length):
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>", model_max_length=max_length
    )


def _t5_config():
    return transformers.T5Config(vocab_size=1103, d_model=32, d_kv=8, d_ff=37, num_layers=5, num_heads=4)


LOCAL = {
    ("AutoConfig", "hf-internal-testing/tiny-random-t5"): _t5_config,
    ("AutoTokenizer", "hf-internal-testing/tiny-random-t5"): lambda: _tokenizer(512),
    ("CLIPTokenizer", "hf-internal-testing/tiny-random-clip"): lambda: _tokenizer(77),
}


def _patch(name):
    cls = getattr(transformers, name)
    original = cls.from_pretrained.__func__

    def from_pretrained(klass, path, *args, **kwargs):
        make = LOCAL.get((name, str(path)))
        return make() if make is not None else original(klass, path, *args, **kwargs)

    cls.from_pretrained = classmethod(from_pretrained)


for _name in {n for n, _ in LOCAL}:
    _patch(_name)
"""


def extract_tests(git_dir: Path, into: Path) -> None:
    """``git archive HEAD tests`` of the snapshot, unpacked under ``into``."""
    data = subprocess.run(
        ["git", f"--git-dir={git_dir}", "archive", "HEAD", "tests"], check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    (into / "tcpass_swap.py").write_text(PLUGIN)
    (into / "offline_hub.py").write_text(HUB_PLUGIN)


def run_arm(root: Path, test_file: str, arm: str, timeout_s: int) -> dict:
    """One pytest run; returns counts, the outcome of every test (by name) and each failure's message."""
    env = {**os.environ, "TCPASS_ARM": arm, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"}
    junit = root / f"junit-{arm}.xml"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "offline_hub",
        f"--junitxml={junit}",
        test_file,
    ]
    if arm != "plain":
        cmd[6:6] = ["-p", "tcpass_swap"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout_s)
    if not junit.is_file():
        raise RuntimeError(f"pytest ran nothing for {test_file} ({arm}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    outcomes, errors = {}, {}
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        status = "passed"
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                status = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                if tag != "skipped":
                    errors[name] = (found.get("message") or "").splitlines()[0][:300] if found.get("message") else ""
                break
        outcomes[name] = status
    counts: dict[str, int] = {}
    for status in outcomes.values():
        counts[status] = counts.get(status, 0) + 1
    return {"counts": counts, "outcomes": outcomes, "errors": errors, "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--diffusers", type=Path, required=True, help="git directory of a diffusers snapshot")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--out", type=Path, default=Path("bench/results/diffusers_tests.json"))
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per pytest run")
    args = parser.parse_args()
    commit = subprocess.run(
        ["git", f"--git-dir={args.diffusers}", "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    import diffusers
    import torch

    report = {"diffusers_snapshot": commit, "diffusers_installed": diffusers.__version__, "torch": torch.__version__}
    report["families"] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        extract_tests(args.diffusers, root)
        for family in args.families:
            arms = {}
            for arm in ARMS:
                arms[arm] = run_arm(root, FAMILIES[family], arm, args.timeout)
                print(f"{family:13s} {arm:9s} {arms[arm]['counts']} ({arms[arm]['seconds']} s)", flush=True)
            plain = arms["plain"]["outcomes"]
            for arm in ARMS[1:]:
                only = {
                    node: arms[arm]["errors"].get(node, "")
                    for node, status in arms[arm]["outcomes"].items()
                    if status in ("failed", "error") and plain.get(node) == "passed"
                }
                arms[arm]["fail_only_with_tcpass"] = only
                for node, why in only.items():
                    print(f"  {arm}: {node.split('::')[-1]}: {why}")
                del arms[arm]["outcomes"]
            del arms["plain"]["outcomes"]
            report["families"][family] = {"file": FAMILIES[family], **arms}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
