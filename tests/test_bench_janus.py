"""The Janus benchmark end to end at toy size: every method family runs (text methods with the
biased oracle, oracle Zero123 image-to-3D from a front render), scores land in the JSON and the
labelled turntable strip is written."""

import json
import sys
from pathlib import Path

import imageio.v3 as iio
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_janus  # noqa: E402


def test_quick_run_scores_text_and_zero123_methods(tmp_path):
    out_json, gif = tmp_path / "janus.json", tmp_path / "strip.gif"
    argv = ["--quick", "--steps", "3", "--resolution", "16", "--eval-views", "4", "--eval-resolution", "16",
            "--methods", "sds-plain", "oracle-zero123", "--json", str(out_json), "--gif", str(gif),
            "--gif-frames", "2", "--gif-resolution", "24", "--out", str(tmp_path / "runs")]
    assert bench_janus.main(argv) == 0
    payload = json.loads(out_json.read_text())
    assert payload["seeds"] == [0] and payload["notes"] == []
    assert set(payload["methods"]) == {"sds-plain", "oracle-zero123"}
    for result in payload["methods"].values():
        assert 0.0 <= result["janus_rate"] <= 1.0 and 0.0 <= result["mask_iou"] <= 1.0 and result["front_true_ratio_back"] > 0
        assert len(result["per_seed"][0]["views"]) == 4
    assert (tmp_path / "runs" / "input.png").exists()  # the Zero123 input render
    frames = iio.imread(gif, index=None)
    assert frames.shape[0] == 2 and frames.shape[2] == 3 * 24  # reference + two methods, side by side
    assert frames.shape[1] == 24 + 14  # the label band


def test_unknown_method_is_named(capsys):
    with pytest.raises(SystemExit):
        bench_janus.main(["--methods", "sds-plain", "nope"])
    assert "nope" in capsys.readouterr().err
