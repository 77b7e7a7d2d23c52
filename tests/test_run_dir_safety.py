"""Run-directory hardening: safe checkpoint loading, fallback past a corrupt checkpoint, the run
lock, temporary-file sweeping, torn metrics lines and OS errors as one clear line."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from distill3d.engine import checkpoint as ck
from distill3d.engine.checkpoint import (
    CheckpointError,
    RunDirectoryError,
    RunLockedError,
    atomic_write_text,
    list_checkpoints,
    load_checkpoint,
    load_latest_checkpoint,
    lock_run_dir,
    read_metrics,
    save_checkpoint,
    truncate_metrics,
)


class WritesAFile:
    """What an attacker would pickle: unpickling it creates a file."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def payload(value: float = 1.0) -> dict:
    return {"representation": {"w": torch.full((3,), value)}, "optimizer": {"state": {}, "param_groups": []}}


def test_a_crafted_pickle_does_not_run_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "checkpoints" / "step_0000010.pt"
    evil.parent.mkdir()
    torch.save({"step": 10, "representation": {}, "x": WritesAFile(marker)}, evil)
    with pytest.raises(CheckpointError, match=r"step_0000010\.pt holds objects other than tensors and plain data"):
        load_checkpoint(evil)
    assert not marker.exists()


def test_rng_state_is_plain_data_and_round_trips(tmp_path):
    torch.manual_seed(3), np.random.seed(4), random.seed(5)
    np.random.randn()  # a cached Gaussian in numpy's state
    path = save_checkpoint(tmp_path, 1, payload())
    expected = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)], np.random.randn(2))
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    state = torch.load(path, weights_only=True)  # plain data only
    ck.set_rng_state(state["rng"])
    got = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)], np.random.randn(2))
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1])
    assert expected[2] == got[2] and np.array_equal(expected[3], got[3])


@pytest.mark.parametrize("damage", ["garbage", "truncated", "crafted"])
def test_corrupt_newest_checkpoint_falls_back_and_names_it(tmp_path, damage):
    good = save_checkpoint(tmp_path, 10, payload(1.0), keep=5)
    bad = save_checkpoint(tmp_path, 20, payload(2.0), keep=5)
    if damage == "garbage":
        bad.write_bytes(b"not a checkpoint at all")
    elif damage == "truncated":
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    else:
        torch.save({"step": 20, "x": WritesAFile(tmp_path / "pwned")}, bad)
    warnings = []
    path, state = load_latest_checkpoint(tmp_path, warn=warnings.append)
    assert path == good and state["step"] == 10 and torch.equal(state["representation"]["w"], torch.ones(3))
    assert len(warnings) == 1 and str(bad) in warnings[0] and "falling back" in warnings[0]
    assert not (tmp_path / "pwned").exists()
    # Continuing from step 10 abandons the newer (bad) checkpoint: the next save removes it, so
    # keep=1 can never leave only the corrupt file behind.
    save_checkpoint(tmp_path, 15, payload(1.5), keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000015.pt"]


def test_no_readable_checkpoint_is_one_clear_error(tmp_path):
    (tmp_path / "step_0000005.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* can be read: .*step_0000005\.pt is truncated or corrupt"):
        load_latest_checkpoint(tmp_path, warn=lambda m: None)
    assert load_latest_checkpoint(tmp_path / "none") is None


def test_lock_sweeps_leftover_temporary_files(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    leftovers = [run / "checkpoints" / ".step_0000030.k2j4_x.tmp.pt", run / ".config.ab12.tmp.yaml", run / ".turntable.zz.tmp.mp4"]
    kept = [run / "checkpoints" / "step_0000020.pt", run / ".hidden", run / "notes.tmp.txt"]
    for p in leftovers + kept:
        p.write_text("x")
    with lock_run_dir(run):
        assert not any(p.exists() for p in leftovers)
        assert all(p.exists() for p in kept)


def test_two_processes_cannot_write_one_run(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from distill3d.engine.checkpoint import lock_run_dir; "
         "l = lock_run_dir(sys.argv[1]); print('locked', flush=True); time.sleep(60)", str(run)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=rf"{run} is in use by another distill3d process \(pid {holder.pid}\)"):
            lock_run_dir(run)
    finally:
        holder.kill()  # a killed holder leaves no stale lock behind
        holder.wait()
    with lock_run_dir(run) as lock:
        assert lock.held
        with pytest.raises(RunLockedError):  # a second writer in this process is refused too
            lock_run_dir(run)
    lock_run_dir(run).release()


def test_torn_metrics_lines_are_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 0.1 * s}) for s in (10, 20, 30)]
    # A kill mid-write leaves half a line; a resumed run then appends after it on the same line.
    path.write_text(lines[0] + "\n" + lines[1][:9] + lines[2] + "\n" + '{"step": 40, "lo')
    assert [r["step"] for r in read_metrics(path)] == [10]
    path.write_text("\n".join(lines) + "\n" + '{"step": 40, "lo')
    assert [r["step"] for r in read_metrics(path)] == [10, 20, 30]
    truncate_metrics(path, 20)
    assert path.read_text() == "".join(json.dumps(json.loads(l)) + "\n" for l in lines[:2])


def test_name_too_long_is_one_clear_line(tmp_path):
    with pytest.raises(RunDirectoryError, match=r"could not write .*: the file name is too long for the file system"):
        atomic_write_text(tmp_path / ("x" * 300 + ".yaml"), "a: 1\n")


@pytest.mark.parametrize("code, fragment", [(errno.ENOSPC, "no space left on the device"), (errno.EROFS, "the file system is read-only")])
def test_disk_full_and_read_only_are_one_clear_line_and_leave_nothing(tmp_path, monkeypatch, code, fragment):
    good = save_checkpoint(tmp_path, 10, payload())

    def failing_fsync(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(ck.os, "fsync", failing_fsync)
    with pytest.raises(RunDirectoryError, match=rf"could not write .*step_0000020\.pt: {fragment}"):
        save_checkpoint(tmp_path, 20, payload())
    assert list_checkpoints(tmp_path) == [good]  # the run stays resumable from the last one
    assert not list(tmp_path.glob(".*tmp*"))
