import os

import pytest
import torch

from encdiff import ckpt_files as ckpt
from encdiff.errors import UserError


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "model.w": torch.randn(64, 32, generator=g),
        "model.b": torch.randn(32, generator=g).bfloat16(),
        "opt.0.step": torch.tensor(3.0),
    }


def test_round_trip_with_metadata(tmp_path):
    t = _tensors()
    p = tmp_path / ckpt.checkpoint_name(12)
    ckpt.save_checkpoint(p, t, step=12, stage="encdiff", config_toml="[run]\n", extra={"groups": [{"lr": 0.1}]})
    back, meta = ckpt.load_checkpoint(p)
    assert meta["step"] == "12" and meta["stage"] == "encdiff" and meta["groups"] == '[{"lr": 0.1}]'
    assert all(torch.equal(back[k], t[k]) for k in t)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary file left


def test_optimizer_state_round_trip():
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    tensors, groups = ckpt.optimizer_to_tensors(opt, "opt")
    opt2 = torch.optim.AdamW(model.parameters(), lr=5.0)
    ckpt.optimizer_from_tensors(opt2, "opt", tensors, groups)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s2["param_groups"][0]["lr"] == 1e-3
    for i in s1["state"]:
        for k in s1["state"][i]:
            assert torch.equal(torch.as_tensor(s1["state"][i][k]), torch.as_tensor(s2["state"][i][k]))


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_file_is_detected_and_skipped(tmp_path, damage):
    for step in (10, 20):
        ckpt.save_checkpoint(
            tmp_path / ckpt.checkpoint_name(step), _tensors(), step=step, stage="vqvae", config_toml=""
        )
    newest = tmp_path / ckpt.checkpoint_name(20)
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-100] ^= 0x40  # a flipped bit inside the tensor bytes
    newest.write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupt checkpoint|not a readable"):
        ckpt.load_checkpoint(newest)
    with pytest.warns(UserWarning, match="skipping"):
        path, _, meta = ckpt.latest_good_checkpoint(tmp_path)
    assert path.name == ckpt.checkpoint_name(10) and meta["step"] == "10"


def test_not_a_checkpoint(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"hello world, not safetensors")
    with pytest.raises(UserError, match="junk.safetensors"):
        ckpt.load_checkpoint(junk)
    with pytest.raises(UserError, match="not found"):
        ckpt.load_checkpoint(tmp_path / "missing.safetensors")


def test_prune_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(
            tmp_path / ckpt.checkpoint_name(step), _tensors(), step=step, stage="vqvae", config_toml=""
        )
    ckpt.prune_checkpoints(tmp_path, 2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [ckpt.checkpoint_name(3), ckpt.checkpoint_name(4)]


def test_a_run_dir_opens_its_newest_good_checkpoint(tmp_path):
    (tmp_path / "encdiff").mkdir()
    for step in (5, 7, 9):
        ckpt.save_checkpoint(
            tmp_path / "encdiff" / ckpt.checkpoint_name(step), _tensors(), step=step, stage="encdiff", config_toml=""
        )
    assert ckpt.load_stage_checkpoint(tmp_path)[0].name == ckpt.checkpoint_name(9)
    newest = tmp_path / "encdiff" / ckpt.checkpoint_name(9)
    newest.write_bytes(newest.read_bytes()[:-100])  # truncated: train.py would skip it, and so does evaluate
    with pytest.warns(UserWarning, match="skipping"):
        path, _, meta = ckpt.load_stage_checkpoint(tmp_path)
    assert path.name == ckpt.checkpoint_name(7) and meta["step"] == "7"
    with pytest.raises(UserError, match="ckpt_00000009.safetensors: not a readable checkpoint"):
        ckpt.load_stage_checkpoint(newest)  # a file named on purpose is never swapped for another
    with pytest.raises(UserError, match="no encdiff checkpoint"):
        (tmp_path / "empty").mkdir()
        ckpt.load_stage_checkpoint(tmp_path / "empty")
