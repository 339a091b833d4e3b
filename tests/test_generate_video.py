"""`tcpass generate` on a video pipeline (a tiny `WanPipeline`) writes a video a person can open: an
animated WebP or GIF through Pillow, an MP4 through imageio-ffmpeg (the video extra); the suffix of
``--out`` names the format, ``--frames`` and ``--fps`` set its length and rate, and misuse is one line
before the run."""

import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageSequence

from tcpass import CachePlan, TPRRSchedule
from tcpass.cli import main
from tcpass.plan import save_plan
from tests.pipelines import build

FRAMES = 5  # Wan's VAE takes 4k + 1 frames
PLAN = CachePlan(schedule=TPRRSchedule(boundary_timestep=0, intervals=(2, 2)))  # 2 steps: FULL, then CACHED


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    path = tmp_path_factory.mktemp("wan")
    build("wan").save_pretrained(path)
    return path


def generate(model, out, *extra):
    args = ["generate", "--model", model, "--prompt", "a cat", "--steps", "2", "--height", "16", "--width", "16"]
    return CliRunner().invoke(main, [str(a) for a in [*args, "--out", out, *extra]])


def pil_frames(path) -> list[np.ndarray]:
    with Image.open(path) as video:
        return [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(video)]


def assert_a_moving_video(frames, size=(16, 16)):
    assert len(frames) == FRAMES
    assert all(frame.shape == (*size, 3) for frame in frames)
    assert np.abs(frames[-1].astype(int) - frames[0].astype(int)).max() > 10, "the frames of the video must differ"


@pytest.mark.parametrize(("suffix", "fps", "frame_ms"), [(".webp", None, 62), (".gif", "8", 120)])
def test_animated_webp_and_gif_through_pillow(wan, tmp_path, suffix, fps, frame_ms):
    out = tmp_path / f"x{suffix}"
    result = generate(wan, out, "--frames", FRAMES, *(["--fps", fps] if fps else []))
    assert result.exit_code == 0, result.output
    assert f"wrote {FRAMES} frames at {fps or 16} fps to {out}" in result.output
    with Image.open(out) as video:
        assert video.n_frames == FRAMES and video.is_animated
        video.load()  # WebP reads a frame's duration with the frame
        assert video.info["duration"] == frame_ms  # 1000 / fps ms (GIF keeps hundredths of a second)
    assert_a_moving_video(pil_frames(out))
    assert [p.name for p in tmp_path.iterdir()] == [out.name], "the atomic write leaves no temporary file"


def test_mp4_through_imageio_ffmpeg(wan, tmp_path):
    iio = pytest.importorskip("imageio.v3")
    pytest.importorskip("imageio_ffmpeg")
    out = tmp_path / "x.mp4"
    out.write_bytes(b"an older video")
    result = generate(wan, out, "--frames", FRAMES)
    assert result.exit_code == 0, result.output
    assert iio.immeta(out, plugin="FFMPEG")["fps"] == 16
    assert_a_moving_video(list(iio.imread(out, plugin="FFMPEG")))
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_a_plan_runs_cached_steps_into_the_video(wan, tmp_path):
    save_plan(PLAN, tmp_path / "plan.json")
    out = tmp_path / "x.webp"
    result = generate(wan, out, "--frames", FRAMES, "--plan", tmp_path / "plan.json")
    assert result.exit_code == 0, result.output
    assert "'full': 2, 'cached': 2" in result.output  # one FULL and one CACHED step, conditional and not
    assert_a_moving_video(pil_frames(out))


def test_an_image_suffix_on_a_video_pipeline_names_the_video_suffixes(wan, tmp_path):
    result = generate(wan, tmp_path / "x.png")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "--out" in result.output and "makes a video; use .mp4, .webp, .gif" in result.output
    assert list(tmp_path.iterdir()) == []


def test_mp4_without_imageio_ffmpeg_names_the_video_extra(wan, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # `import imageio_ffmpeg` raises, as when not installed
    result = generate(wan, tmp_path / "x.mp4")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "imageio_ffmpeg is missing" in result.output and "pip install 'tcpass[video]'" in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option", [["--frames", "5"], ["--fps", "8"]])
def test_video_options_on_an_image_pipeline_are_refused(tmp_path, option):
    build("dit").save_pretrained(tmp_path / "dit")
    args = ["generate", "--model", tmp_path / "dit", "--class-label", "1", "--steps", "2", "-o", tmp_path / "x.png"]
    result = CliRunner().invoke(main, [str(a) for a in [*args, *option]])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert f"{option[0]} {option[1]}: DiTPipeline makes an image, not a video" in result.output
    assert not (tmp_path / "x.png").exists()
