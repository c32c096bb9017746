"""Evaluating a run directory while it trains: evaluate.py picks the newest good checkpoint
(encdiff.ckpt_contents.load_trained), which must be a whole one whatever the writer is doing."""

import os
import shutil
import threading

import safetensors.torch

from encdiff import ckpt_files
from encdiff.ckpt_contents import load_trained
from encdiff.ckpt_files import load_checkpoint


def copy_stage(straight, tmp_path):
    """straight's stage-2 checkpoints (steps 3 and 6) in a run directory of this test."""
    shutil.copytree(straight / "encdiff", tmp_path / "run" / "encdiff")
    return tmp_path / "run" / "encdiff"


def test_a_reader_during_a_write_gets_the_previous_checkpoint(tmp_path, straight, monkeypatch):
    stage = copy_stage(straight, tmp_path)
    tensors, meta = load_checkpoint(stage / "ckpt_00000006.safetensors")
    extra = {k: v for k, v in meta.items() if k not in ("step", "stage", "config", "versions", "checksum")}
    half_written, go_on = threading.Event(), threading.Event()

    def paused_save(tensors, filename, metadata=None):
        """safetensors' save_file that stops after half of the bytes until the test lets it go on."""
        data = safetensors.torch.save(tensors, metadata=metadata)
        with open(filename, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            half_written.set()
            go_on.wait(60)
            f.write(data[len(data) // 2 :])

    monkeypatch.setattr(ckpt_files, "save_file", paused_save)
    newest = stage / "ckpt_00000009.safetensors"
    kwargs = dict(step=9, stage="encdiff", config_toml=meta["config"], extra=extra)
    writer = threading.Thread(target=ckpt_files.save_checkpoint, args=(newest, tensors), kwargs=kwargs, daemon=True)
    writer.start()
    try:
        assert half_written.wait(60)
        partial = [p.stat().st_size for p in stage.iterdir() if p.name.startswith(".ckpt_00000009")]
        assert len(partial) == 1 and 0 < partial[0] < (stage / "ckpt_00000006.safetensors").stat().st_size
        trained = load_trained(stage.parent)  # what `evaluate.py RUN` loads
        assert (trained.path.name, trained.step) == ("ckpt_00000006.safetensors", 6)
    finally:
        go_on.set()
        writer.join(60)
    assert not writer.is_alive()
    trained = load_trained(stage.parent)
    assert (trained.path.name, trained.step) == ("ckpt_00000009.safetensors", 9)
    assert [p.name for p in stage.iterdir() if p.name.startswith(".")] == []


def test_a_checkpoint_pruned_while_it_is_picked(tmp_path, straight, monkeypatch):
    """The reader lists the checkpoints; before it opens the newest, the run writes a newer one and
    prunes the old ones (run.keep_last = 1): the reader looks again instead of failing."""
    stage = copy_stage(straight, tmp_path)
    real_list = ckpt_files.list_checkpoints
    trained_on = []

    def list_then_the_run_goes_on(stage_dir):
        listed = real_list(stage_dir)
        if not trained_on:
            trained_on.append(True)
            tmp = stage / ".ckpt_00000009.safetensors.tmp1"
            shutil.copy(stage / "ckpt_00000006.safetensors", tmp)
            os.replace(tmp, stage / "ckpt_00000009.safetensors")
            ckpt_files.prune_checkpoints(stage, keep_last=1)
        return listed

    monkeypatch.setattr(ckpt_files, "list_checkpoints", list_then_the_run_goes_on)
    path, _, _ = ckpt_files.latest_good_checkpoint(stage)  # what load_trained does after its own listing
    assert path.name == "ckpt_00000009.safetensors"
