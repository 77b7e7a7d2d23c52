"""`distill3d batch`: jobs files and their errors, worker pinning, and end to end: 3 short oracle
jobs (one broken) with 2 local workers, the rerun that skips finished jobs, and the same batch on a
local Ray cluster whose worker is killed mid-job (the job resumes from its checkpoint)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from distill3d.engine.batch import Job, JobsFileError, job_command, load_jobs, visible_gpus, worker_env
from distill3d.engine.cli import app

# Short oracle runs: a checkpoint every 4 steps so a killed job has one to resume from.
QUICK = [
    "trainer.steps=16", "trainer.checkpoint_every=4", "trainer.threads=1", "trainer.resolution=16",
    "trainer.eval_resolution=16", "trainer.eval_views=2", "trainer.video_frames=4", "trainer.video_resolution=16",
    "representation.levels=4", "representation.log2_table_size=12", "representation.max_resolution=64",
    "representation.samples_per_ray=16", "representation.occupancy.resolution=16",
]
JOBS = """\
- {prompt: "a few primitives", scene: default}
- {name: cylinders, prompt: "two cylinders", scene: two_cylinders, seed: 3}
- {name: broken, prompt: "a scene that is not there", scene: nowhere/scene.json}
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ----- jobs files ---------------------------------------------------------------------------------
def test_text_yaml_jsonl_and_image_folder(tmp_path):
    jobs = load_jobs(write(tmp_path / "p.txt", "# my prompts\na DSLR photo of a Corgi!\n\n  a ceramic mug  \n"))
    assert [(j.name, j.prompt) for j in jobs] == [("a-dslr-photo-of-a-corgi", "a DSLR photo of a Corgi!"), ("a-ceramic-mug", "a ceramic mug")]
    assert jobs[1].source == "p.txt line 4"

    write(tmp_path / "scene.json", "{}")
    jobs = load_jobs(write(tmp_path / "j.yaml", "jobs:\n- a mug\n- {prompt: a mug, seed: 2, scene: scene.json, set: {trainer.steps: 5, 'cameras.elevation': [0, 30]}}\n"))
    assert [j.name for j in jobs] == ["a-mug", "a-mug-seed2"]
    assert jobs[1].scene == str((tmp_path / "scene.json").resolve())  # relative to the jobs file
    assert jobs[1].overrides == ["trainer.steps=5", "cameras.elevation=[0, 30]"]

    jobs = load_jobs(write(tmp_path / "j.jsonl", '{"name": "one", "prompt": "x", "set": ["trainer.steps=3"]}\n\n"y"\n'))
    assert [(j.name, j.prompt, j.overrides) for j in jobs] == [("one", "x", ["trainer.steps=3"]), ("y", "y", [])]

    images = tmp_path / "photos"
    images.mkdir()
    for name in ("b.png", "a.JPG", "notes.txt"):
        (images / name).write_bytes(b"")
    jobs = load_jobs(images)
    assert [(j.name, Path(j.image).name, j.prompt) for j in jobs] == [("a", "a.JPG", ""), ("b", "b.png", "")]


@pytest.mark.parametrize(
    "name, text, fragment",
    [
        ("empty.txt", "# nothing yet\n\n", "the jobs list is empty"),
        ("empty.yaml", "jobs: []\n", "the jobs list is empty"),
        ("bad.yaml", "- a\n- {prompt: b\n", "not valid YAML at line 3"),
        ("bad.jsonl", '{"prompt": "a"}\n{"prompt": b}\n', "line 2 is not valid JSON"),
        ("dup.txt", "a mug\nA mug!\n", "line 1 and dup.txt line 2 both make job 'a-mug'"),
        ("dup.yaml", "- {name: x, prompt: a}\n- {name: x, prompt: b}\n", "entry 1 and dup.yaml entry 2 both make job 'x'"),
        ("key.yaml", "- {prompt: a, steps: 3}\n", "entry 1: unknown key 'steps'"),
        ("none.yaml", "- {seed: 3}\n", "entry 1: a job needs a 'prompt' or an 'image'"),
        ("seed.jsonl", '{"prompt": "a", "seed": "x"}\n', "line 1: 'seed' must be an integer"),
        ("elev.yaml", "- {image: a.png, elevation: high}\n", "entry 1: 'elevation' must be a number"),
        ("name.yaml", "- {name: ../up, prompt: a}\n", "job name '../up' must start"),
    ],
)
def test_bad_jobs_files_name_the_entry(tmp_path, name, text, fragment):
    with pytest.raises(JobsFileError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load_jobs(write(tmp_path / name, text))


def test_empty_image_folder_and_missing_file(tmp_path):
    with pytest.raises(JobsFileError, match="holds no images"):
        load_jobs(tmp_path)
    with pytest.raises(JobsFileError, match="does not exist"):
        load_jobs(tmp_path / "nope.txt")


def test_job_command_is_the_ordinary_cli(tmp_path):
    job = Job("x", "a mug", image="/data/mug.png", elevation=10.0, seed=4, scene="default", overrides=["trainer.steps=9"])
    cmd = job_command(job, "oracle-nerf", tmp_path / "x", ["trainer.steps=5"])
    assert cmd[:4] == [sys.executable, "-m", "distill3d.engine.cli", "generate"]
    assert cmd[4:] == ["a mug", "--recipe", "oracle-nerf", "--out", str(tmp_path / "x"), "--image", "/data/mug.png", "--elevation", "10.0",
                       "--seed", "4", "--scene", "default", "--set", "trainer.steps=5", "--set", "trainer.steps=9"]  # the job's own override wins


def test_workers_are_pinned_to_gpus(monkeypatch):
    assert [worker_env(slot, 3, ["0", "1"])["CUDA_VISIBLE_DEVICES"] for slot in range(3)] == ["0", "1", "0"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert visible_gpus() == ["2", "5"]
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert worker_env(0, 2, []) == {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // 2))}


# ----- command-line errors ------------------------------------------------------------------------
def cli(*args):
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def test_cli_errors_are_one_line(tmp_path):
    code, out = cli("batch", str(write(tmp_path / "e.txt", "\n")), "--recipe", "oracle-nerf", "--out", str(tmp_path / "o"))
    assert code == 2 and "error: " in out and "the jobs list is empty" in out
    jobs = write(tmp_path / "j.txt", "a mug\n")
    code, out = cli("batch", str(jobs), "--recipe", "nope", "--out", str(tmp_path / "o"))
    assert code == 2 and "unknown recipe 'nope'" in out
    # A port nobody listens on: refused at once with a clear message (and no Ray started).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.time()
    code, out = cli("batch", str(jobs), "--recipe", "oracle-nerf", "--out", str(tmp_path / "o"), "--ray", f"127.0.0.1:{port}")
    assert code == 2 and f"cannot reach the Ray cluster at 127.0.0.1:{port}" in out, out
    assert time.time() - started < 15
    code, out = cli("batch", str(jobs), "--recipe", "oracle-nerf", "--out", str(tmp_path / "o"), "--ray", "nonsense")
    assert code == 2 and "expected HOST:PORT" in out


def test_silent_ray_address_does_not_hang(tmp_path, monkeypatch):
    """Something accepts TCP at the address but never answers like a Ray head."""
    pytest.importorskip("ray")
    import distill3d.engine.batch_ray as batch_ray

    monkeypatch.setattr(batch_ray, "INIT_TIMEOUT_S", 3.0)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        started = time.time()
        code, out = cli("batch", str(write(tmp_path / "j.txt", "a mug\n")), "--recipe", "oracle-nerf", "--out", str(tmp_path / "o"),
                        "--ray", f"127.0.0.1:{port}")
    assert code == 2 and f"cannot connect to a Ray cluster at 127.0.0.1:{port}" in out, out
    assert time.time() - started < 30


def test_ray_missing_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    code, out = cli("batch", str(write(tmp_path / "j.txt", "a mug\n")), "--recipe", "oracle-nerf", "--out", str(tmp_path / "o"), "--ray")
    assert code == 2 and 'pip install "distill3d[ray]"' in out


# ----- end to end ---------------------------------------------------------------------------------
def run_batch(*args):
    cmd = [sys.executable, "-m", "distill3d.engine.cli", "batch", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def sets(items):
    return sum((["--set", s] for s in items), [])


def check_summary(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    jobs = {j["name"]: j for j in summary["jobs"]}
    assert set(jobs) == {"a-few-primitives", "cylinders", "broken"}
    assert summary["counts"]["done"] == 2 and summary["counts"]["failed"] == 1
    assert jobs["broken"]["status"] == "failed" and "scene nowhere/scene.json does not exist" in jobs["broken"]["error"]
    for name in ("a-few-primitives", "cylinders"):
        assert jobs[name]["status"] == "done"
        assert jobs[name]["eval"]["psnr"] > 5  # eval figures come back from the run
        assert (out / name / "turntable.gif").exists() and (out / name / "index.html").exists()
    gallery = (out / "index.html").read_text()
    assert gallery.count('class="card"') == 3 and "nowhere/scene.json does not exist" in gallery
    return jobs


@pytest.mark.slow
def test_batch_locally_then_on_ray_with_a_killed_worker(tmp_path):
    jobs_file = write(tmp_path / "jobs.yaml", JOBS)
    started = time.time()
    out = tmp_path / "local"
    proc = run_batch(str(jobs_file), "--recipe", "oracle-nerf", "--out", str(out), "--workers", "2", *sets(QUICK))
    stdout, stderr = proc.communicate(timeout=400)
    assert proc.returncode == 1, stderr  # not all jobs succeeded
    check_summary(out)
    assert "0/3 done, 1 running" in stderr and "broken: FAILED: scene nowhere/scene.json does not exist" in stderr
    table = stdout.splitlines()
    assert table[0].split() == ["job", "status", "time", "psnr", "iou", "note"] and len(table) == 4

    # Again: finished jobs are skipped (their runs untouched), the failed one is tried again.
    mtime = (out / "cylinders" / "turntable.gif").stat().st_mtime
    stdout, stderr = run_batch(str(jobs_file), "--recipe", "oracle-nerf", "--out", str(out), *sets(QUICK)).communicate(timeout=400)
    assert "cylinders: already done, skipped" in stderr and "broken: FAILED" in stderr
    assert (out / "cylinders" / "turntable.gif").stat().st_mtime == mtime
    print(f"local batch and rerun: {time.time() - started:.0f} s")

    pytest.importorskip("ray", reason="the Ray half needs `pip install distill3d[ray]`")
    out = tmp_path / "ray"
    victim = out / "cylinders"
    proc = run_batch(str(jobs_file), "--recipe", "oracle-nerf", "--out", str(out), "--workers", "2", *sets(QUICK), "--ray")
    # Kill the Ray worker running the job once the job has written a checkpoint.
    deadline = time.time() + 300  # generous: a loaded machine starts processes slowly
    while not list((victim / "checkpoints").glob("step_*.pt")):
        assert time.time() < deadline and proc.poll() is None, "the job never wrote a checkpoint"
        time.sleep(0.1)
    state = json.loads((victim / "job.json").read_text())
    assert state["status"] == "running" and state["attempts"] == 1
    os.kill(state["pid"], signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=400)
    assert proc.returncode == 1, stderr
    jobs = check_summary(out)
    assert jobs["cylinders"]["attempts"] == 2 and jobs["cylinders"]["resumed_from"] >= 4, jobs["cylinders"]
    log = (victim / "job.log").read_text()
    assert "=== attempt 2" in log and "resuming at step" in log
    steps = [json.loads(line)["step"] for line in (victim / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 16  # each step logged once, to the end
    print(f"with the Ray batch: {time.time() - started:.0f} s")
