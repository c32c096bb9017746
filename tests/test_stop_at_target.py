"""eval.stop_at_target: stage 2 ends at the first live-metric point at both targets (eval.patience in
a row), with that step's checkpoint, exit 0, the reason in the last line and in log.jsonl; a
resumed run keeps the rule, a finished one is skipped; every rank stops at the same step.
Targets of 0 make every point reach them, so the patience decides the step."""

import json
import shutil

import pytest
import torch

from conftest import final, run_train, train_args, train_error, train_in_process, with_straights_vq

RULE = ["--eval.every=2", "--eval.stop_at_target=true", "--eval.target_factor_vae=0", "--eval.target_dci=0"]


def ckpt_steps(out):
    return sorted(int(p.stem.split("_")[1]) for p in (out / "encdiff").glob("ckpt_*.safetensors"))


def log_rows(out):
    return [json.loads(line) for line in (out / "encdiff" / "log.jsonl").read_text().splitlines()]


def test_it_stops_at_the_first_point_that_keeps_the_targets_and_a_resume_keeps_the_rule(
    tmp_path, tiny_data, straight, capsys
):
    whole = with_straights_vq(tmp_path / "whole", straight)
    r = run_train(whole, tiny_data, "--encdiff.steps=40", *RULE, "--eval.patience=2")
    assert "encdiff: the targets reached at step 4 (eval.stop_at_target): finished there" in r.stdout
    assert "time to disentanglement" in r.stdout and f"done: {whole}" in r.stdout
    assert ckpt_steps(whole)[-1] == 4
    rows = log_rows(whole)
    assert (
        rows[-1]["step"] == 4
        and rows[-1]["stopped_at_target"]
        and not any("stopped_at_target" in row for row in rows[:-1])
    )
    # the same command again: finished, nothing trained, exit 0
    assert train_in_process(*train_args(whole, tiny_data, "--encdiff.steps=40", *RULE, "--eval.patience=2")) == 0
    assert "finished already (the targets reached at step 4, eval.stop_at_target), skipped" in capsys.readouterr().out
    assert ckpt_steps(whole)[-1] == 4

    # stopped after step 3 (its checkpoint), resumed: it keeps the rule and stops where `whole` did
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    (resumed / "encdiff" / "ckpt_00000004.safetensors").unlink()
    r = run_train(resumed, tiny_data, "--encdiff.steps=40", *RULE, "--eval.patience=2")
    assert "steps 3 -> 40" in r.stdout and ckpt_steps(resumed)[-1] == 4
    assert [row["step"] for row in log_rows(resumed)] == [2, 4] and log_rows(resumed)[-1]["stopped_at_target"]
    a, b = final(whole, "encdiff"), final(resumed, "encdiff")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # 14 s: torchrun, two ranks and a metrics worker (CI's suite budget)
def test_every_rank_stops_at_the_same_step(tmp_path, tiny_data, straight):
    out = with_straights_vq(tmp_path / "run", straight)
    r = run_train(out, tiny_data, "--encdiff.steps=40", *RULE, nproc=2)
    assert r.stdout.count("the targets reached at step 2") == 1 and ckpt_steps(out) == [2]


def test_the_rule_needs_its_points_and_its_metrics(tmp_path, tiny_data):
    assert "eval.stop_at_target: needs eval.every > 0" in train_error(
        *train_args(tmp_path / "run", tiny_data, "--eval.stop_at_target=true")
    )
    assert "needs factor_vae and dci in eval.every_metrics" in train_error(
        *train_args(tmp_path / "run", tiny_data, *RULE, "--eval.every_metrics=mig")
    )
    assert "eval.patience: must be >= 1" in train_error(*train_args(tmp_path / "run", tiny_data, "--eval.patience=0"))
