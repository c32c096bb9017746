"""evaluate.py RUN RUN ...: each run evaluated as alone, then one row per run and mean ± sample std
(n) per score beside the paper's numbers, in the output and in summary.json / summary.csv; a run
that cannot be scored is named and left out."""

import csv
import json
import shutil

import numpy as np
import pytest

import evaluate

METRICS = "factor_vae,dci"


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory, straight):
    """Three copies of the straight run; the first evaluated for real (quick), the other two given its
    metrics.json with other, known scores (an evaluation then finds them up to date and reuses them)."""
    root = tmp_path_factory.mktemp("seeds")
    runs = [shutil.copytree(straight, root / f"seed_{i}") for i in range(3)]
    evaluate.main([str(runs[0]), "--quick", f"--metrics={METRICS}", "--eval.pictures=false"])
    (first,) = (runs[0] / "encdiff").glob("eval_step*")
    record = json.loads((first / "metrics.json").read_text())
    known = {0: (record["factor_vae"]["eval_accuracy"], record["dci"]["disentanglement"])}
    for i, (fv, dci) in ((1, (0.5, 0.25)), (2, (0.75, 0.125))):
        ckpt = runs[i] / "encdiff" / "ckpt_00000006.safetensors"
        mine = json.loads(json.dumps(record).replace(str(runs[0]), str(runs[i])))
        mine["factor_vae"]["eval_accuracy"], mine["dci"]["disentanglement"] = fv, dci
        assert mine["options"]["checkpoint"] == str(ckpt)
        (runs[i] / "encdiff" / first.name).mkdir()
        (runs[i] / "encdiff" / first.name / "metrics.json").write_text(json.dumps(mine))
        known[i] = (fv, dci)
    return root, runs, known


def test_mean_and_std_over_runs_match_numpy_and_a_broken_run_is_left_out(three_runs, tmp_path, capsys):
    root, runs, known = three_runs
    broken = root / "seed_9"  # a run without any stage-2 checkpoint
    broken.mkdir(exist_ok=True)
    out = tmp_path / "summary"
    argv = [str(root / "seed_*"), "--quick", f"--metrics={METRICS}", "--eval.pictures=false", "--out", str(out)]
    assert evaluate.main(argv) == 0  # the glob as a shell would leave it in quotes
    printed = capsys.readouterr().out
    fv = np.array([known[i][0] for i in range(3)])
    dci = np.array([known[i][1] for i in range(3)])
    assert f"{fv.mean():.3f} ± {fv.std(ddof=1):.3f} (3)" in printed
    assert f"{dci.mean():.3f} ± {dci.std(ddof=1):.3f} (3)" in printed
    assert f"left out {broken}:" in printed and "3 runs (mean ± sample std, n)" in printed
    doc = json.loads((out / "summary.json").read_text())
    assert [r["run"] for r in doc["runs"]] == [str(r) for r in runs]
    assert doc["summary"]["factor_vae.eval_accuracy"]["mean"] == pytest.approx(fv.mean())
    assert doc["summary"]["dci.disentanglement"]["std"] == pytest.approx(dci.std(ddof=1))
    assert doc["summary"]["dci.disentanglement"]["n"] == 3 and doc["left_out"][0]["run"] == str(broken)
    rows = list(csv.reader((out / "summary.csv").open()))
    header, by_name = rows[0], {row[0]: row for row in rows[1:]}
    col = header.index("factor_vae.eval_accuracy")
    assert [float(by_name[str(r)][col]) for r in runs] == pytest.approx(fv)
    assert float(by_name["mean"][col]) == pytest.approx(fv.mean()) and by_name["n"][col] == "3"
    # the summary is not replaced without --overwrite, and nothing scorable is one line
    with pytest.raises(evaluate.UserError, match="holds an earlier summary.json"):
        evaluate.main(argv)
    with pytest.raises(evaluate.UserError, match="none of the 2 runs could be scored"):
        evaluate.main([str(broken), str(tmp_path), "--quick"])


def test_every_checkpoint_of_several_runs_draws_them_on_one_axis(three_runs, tmp_path, capsys):
    _, runs, _ = three_runs
    out = tmp_path / "curves"
    with pytest.raises(evaluate.UserError, match="needs --out DIR"):
        evaluate.main([str(runs[0]), str(runs[1]), "--every-checkpoint"])
    assert evaluate.main([str(runs[0]), str(runs[1]), "--every-checkpoint", "--out", str(out)]) == 0
    assert (out / "progress_runs.png").stat().st_size > 5000
    for run in runs[:2]:  # each run's own curve, as for one run
        steps = [json.loads(line)["step"] for line in (run / "encdiff" / "eval_checkpoints" / "metrics.jsonl").open()]
        assert steps == [3, 6]
    assert capsys.readouterr().out.count("time to disentanglement") == 2


def test_the_seeds_of_one_setting_share_a_colour_and_differ_in_line_style():
    from conftest import SMOKE
    from encdiff.config import build_config
    from encdiff.evaluation import run_styles

    base = build_config(SMOKE, [])
    seed_1 = build_config(SMOKE, [("run.seed", "1"), ("run.out_dir", "elsewhere")])
    batch = build_config(SMOKE, [("encdiff.batch_size", "16")])
    assert evaluate.setting_of(seed_1) == evaluate.setting_of(base) != evaluate.setting_of(batch)
    # batch 32 seeds 0 and 1, batch 256 seeds 0 and 1: two colours, a line style per seed
    assert run_styles([0, 0, 1, 1]) == [
        {"color": "C0", "ls": "-"},
        {"color": "C0", "ls": "--"},
        {"color": "C1", "ls": "-"},
        {"color": "C1", "ls": "--"},
    ]
    # one setting (the seeds of --run.seeds): a colour per run, as matplotlib's own cycle
    assert run_styles([0, 0, 0]) == [{"color": f"C{i}", "ls": "-"} for i in range(3)]
