"""The docs keep to the code and the results: every Python snippet in README.md and docs/ runs (on tiny
models, `tests/docs_prelude.py`), every generated table equals what its JSON renders (`bench/report.py`),
and the README stays short."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import report

ROOT = Path(__file__).resolve().parent.parent
NEEDS_GPU = "<!-- snippet: needs a GPU -->"


def snippets() -> list[tuple[str, str, bool]]:
    """``(page:line, code, needs_gpu)`` for every ```python block of the README and the docs."""
    found = []
    for page in report.PAGES:
        text = (ROOT / page).read_text()
        for m in re.finditer(r"```python\n(.*?)```", text, re.S):
            line = text[: m.start()].count("\n") + 1
            needs_gpu = text[: m.start()].rstrip().endswith(NEEDS_GPU)
            found.append((f"{page}:{line}", m.group(1), needs_gpu))
    return found


SNIPPETS = snippets()


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict:
    """Every snippet run once, in one process (`tests/docs_prelude.py`): ``{page:line: None | traceback}``."""
    import torch

    runnable = {where: code for where, code, gpu in SNIPPETS if not gpu or torch.cuda.is_available()}
    work = tmp_path_factory.mktemp("snippets")
    (work / "snippets.json").write_text(json.dumps(runnable))
    command = [sys.executable, "-m", "tests.docs_prelude", "snippets.json", "outcomes.json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((work / "outcomes.json").read_text())


@pytest.mark.parametrize(("where", "code", "needs_gpu"), SNIPPETS, ids=[s[0] for s in SNIPPETS])
def test_every_snippet_runs(where, code, needs_gpu, outcomes):
    if where not in outcomes:
        assert needs_gpu
        pytest.skip(f"{where} is marked '{NEEDS_GPU}' and this machine has no CUDA device")
    assert outcomes[where] is None, f"{where} failed:\n{code}\n{outcomes[where]}"


def test_only_snippets_that_need_a_gpu_are_marked():
    marked = [where for where, code, gpu in SNIPPETS if gpu]
    assert all("cuda" in code for where, code, gpu in SNIPPETS if gpu), marked
    assert len(SNIPPETS) > 8


def test_published_tables_match_their_json():
    assert report.stale_tables() == [], "run python bench/report.py"


def test_an_edited_table_is_caught(tmp_path, monkeypatch):
    page = ROOT / "docs" / "benchmarks.md"
    text = page.read_text()
    edited = re.sub(r"\*\*(\d)\.(\d\d)x\*\*", lambda m: f"**{m[1]}.{int(m[2]) ^ 1:02d}x**", text, count=1)
    assert edited != text
    copy = tmp_path / "docs" / "benchmarks.md"
    copy.parent.mkdir()
    copy.write_text(edited)
    monkeypatch.setattr(report, "ROOT", tmp_path)
    monkeypatch.setattr(report, "load", lambda path: report.json.loads((ROOT / path).read_text()))
    assert report.stale_tables(["docs/benchmarks.md"]) == [
        "docs/benchmarks.md: speed bench/results/speed_dit_s_executors.json bench/results/speed_dit_xl_executors.json"
    ]
    copy.write_text(text)
    assert report.stale_tables(["docs/benchmarks.md"]) == []


def test_the_readme_is_short_and_links_into_the_docs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / link).is_file(), link


def test_the_granularity_table_takes_the_best_of_each_granularity_that_reaches_the_target(monkeypatch):
    def cand(name, family, speed, psnr):
        return {"name": name, "family": family, "predicted_speedup": speed, "psnr_db": psnr, "plan": {}}

    sidecar = {
        "chosen": "f",
        "target_speedup": 2.0,
        "speed_bias": 1.0,
        "speed_tolerance": 0.0,
        "candidates": [
            cand("s", "fewer steps", 2.1, 20.0),
            cand("r", "skip, reuse", 2.2, 21.0),
            cand("f", "skip, forecast", 2.0, 23.5),
            cand("slow", "skip, scaled reuse", 1.9, 30.0),  # below the target: not counted
            cand("b", "skip + block forecast", 2.3, 22.25),
            cand("b2", "skip + block reuse", 2.3, 21.0),
            cand("t", "skip + token caching", 2.4, None),  # not generated
        ],
    }
    monkeypatch.setattr(report, "load", lambda path: sidecar if path.endswith("calibration.json") else {})
    table = report.render_granularity("x.calibration.json")
    row = table.splitlines()[2].split(" | ")
    assert row[1:] == ["2x", "skip, forecast (—x measured)", "23.50", "20.00", "23.50 (forecast)", "22.25 (forecast)",
                       "—", "ddim, ? steps |"]  # fmt: skip
