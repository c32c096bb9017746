"""benchmarks/train_bench.py on the CPU (the table of switches, the torchrun scaling mode) and the
control flow of benchmarks/gpu_check.sh (dry runs, the time budget, a machine without CUDA)."""

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, load_script
from encdiff.errors import UserError

BENCH = ROOT / "benchmarks" / "train_bench.py"
GPU_CHECK = ROOT / "benchmarks" / "gpu_check.sh"
# wheels a developer carries stay out; an exported OUT (the device runner's) or PYTHON must not
# redirect the script's output or interpreter
ENV = {
    **{k: v for k, v in os.environ.items() if k not in ("OUT", "PYTHON")},
    "OMP_NUM_THREADS": "1",
    "GPU_CHECK_WHEELS": "/nonexistent",
    "PYTHON": sys.executable,
}
TABLE_HEAD = "| config | img/s | speedup vs baseline | first-step s | peak MB |"
GPU_CHECK_PARTS = [
    "wheels",
    "env",
    "gpu_tests",
    "attn_bench",
    "train_bench",
    "profile",
    "train_bench_all",
    "data",
    "train",
    "evaluate",
]


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/train_bench.py")


def run(cmd, **kw):
    return subprocess.run(
        cmd, capture_output=True, text=True, env=kw.pop("env", ENV), cwd=ROOT, timeout=kw.pop("timeout", 300), **kw
    )


# ---------------------------------------------------------------------------------------------
# train_bench.py


def test_train_bench_quick_cpu_table_and_json(tmp_path, bench, capsys):
    out = tmp_path / "bench.json"
    tiny = [
        "--vqvae.ch_mult=[1,1,2]",
        "--encdiff.channel_mult=[1,2]",
        "--encdiff.attention_levels=[0,1]",
        "--encdiff.encoder_ch=16",
    ]
    assert bench.main(["--quick", "--batch", "2", "--warmup", "1", "--steps", "1", "--json", str(out), *tiny]) == 0
    stdout = capsys.readouterr().out
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert report["meta"]["model"].startswith("small") and report["meta"]["batch"] == 2
    for stage in ("vqvae", "encdiff"):
        mine = {row["config"]: row for row in rows if row["stage"] == stage}
        assert sorted(mine) == sorted(bench.ROWS)
        base = mine["baseline"]
        assert base["status"] == "ok" and base["speedup"] == pytest.approx(1.0)
        assert base["settings"] == bench.BASELINE
        for row in mine.values():
            assert row["status"] in ("ok", "skipped", "n/a")
            if row["status"] == "ok":
                assert (
                    row["img_s"] > 0 and row["first_step_s"] > 0 and row["peak_mb"] > 0 and math.isfinite(row["loss"])
                )
                assert row["speedup"] == pytest.approx(row["img_s"] / base["img_s"])
            else:
                assert row["reason"] and row["img_s"] is None
        # each switch changes exactly its own settings from the baseline
        for name, change in bench.SWITCHES.items():
            assert mine[name]["settings"] == {**bench.BASELINE, **change}
        # on the CPU, --quick skips compiling; "all" is every other switch that could run alone
        assert mine["compile default"]["status"] == "skipped"
        assert mine["all"]["status"] == "ok" and "compile default" in mine["all"]["without"]
        assert mine["all"]["settings"]["perf.compile"] == "off" and mine["all"]["settings"]["perf.precision"] == "bf16"
    enc = {row["config"]: row for row in rows if row["stage"] == "encdiff"}
    assert enc["attention sdpa"]["status"] == "ok" and enc["cached latents"]["status"] == "ok"
    assert (
        enc["all"]["settings"]["perf.cache_latents"] is True
        and enc["all"]["settings"]["encdiff.grad_checkpoint"] is False
    )
    if importlib.util.find_spec("xformers") is None:
        assert enc["attention xformers"]["status"] == "skipped" and "xformers" in enc["attention xformers"]["reason"]
    vq = {row["config"]: row for row in rows if row["stage"] == "vqvae"}
    assert all(vq[n]["status"] == "n/a" for n in ("attention sdpa", "cached latents", "grad checkpointing off"))
    # the Markdown tables: one per stage, one line per row, numbers as in the JSON
    assert stdout.count(TABLE_HEAD) == 2
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    for row in rows:
        label = row["config"] + (f" (without {', '.join(row['without'])})" if row.get("without") else "")
        cell = f"{row['img_s']:.1f}" if row["status"] == "ok" else f"{row['status']}: {row['reason']}"
        assert any(line.startswith(f"| {label} | {cell} |") for line in lines), (label, cell)


def test_train_bench_profile_reports_each_step_and_writes_a_trace(tmp_path):
    out = tmp_path / "profile.json"
    r = run(
        [
            sys.executable,
            str(BENCH),
            "--profile",
            str(tmp_path / "prof"),
            "--quick",
            "--batch",
            "2",
            "--warmup",
            "1",
            "--steps",
            "2",
            "--stages",
            "encdiff",
            "--perf.compile=off",
            "--json",
            str(out),
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())["profile"]["encdiff"]
    assert [row["step"] for row in report["steps"]] == [1, 2]
    for row in report["steps"]:
        assert row["wall_ms"] > 0 and row["kernels"] > 100 and 0 < row["busy_ms"] <= row["wall_ms"] + 1e-6
        assert row["host_syncs"] == 0  # the trainer's step reads nothing back
    assert len(report["top"]) == 10 and report["top"][0]["total_ms"] >= report["top"][-1]["total_ms"]
    assert json.loads((tmp_path / "prof" / "trace_encdiff.json").read_text())["traceEvents"]
    assert "| step | wall ms | ATen calls | busy ms | host syncs |" in r.stdout


def test_step_profile_union_of_intervals():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import step_profile

    assert step_profile.union_ms([(0, 2_000_000), (1_000_000, 3_000_000), (5_000_000, 6_000_000)]) == 4.0
    assert step_profile.union_ms([]) == 0


@pytest.mark.slow  # 12 s of torchrun (CI's suite budget); train.py's own two-rank runs stay in CI
def test_train_bench_scaling_two_gloo_ranks(tmp_path):
    out = tmp_path / "scaling.json"
    r = run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(BENCH),
            "--scaling",
            "--quick",
            "--batch",
            "4",
            "--warmup",
            "1",
            "--steps",
            "1",
            "--stages",
            "encdiff",
            "--perf.compile=off",
            "--json",
            str(out),
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    one, two = report["scaling"]
    assert (one["ranks"], two["ranks"]) == (1, 2) and len(two["per_rank"]) == 2
    assert all(v > 0 for v in (one["img_s_per_rank"], *two["per_rank"]))
    assert two["img_s_total"] == pytest.approx(sum(two["per_rank"]))
    assert two["efficiency"] == pytest.approx(two["img_s_per_rank"] / one["img_s_per_rank"])
    assert report["perf"]["compile"] == "off" and report["meta"]["world_size"] == 2
    assert r.stdout.count("| stage | ranks |") == 1  # rank 0 alone prints


def fake_table(bench, monkeypatch, measure, argv):
    """run_table with `measure` in place of the real one: the row logic alone, no model."""
    monkeypatch.setattr(bench, "measure", measure)
    args, files, overrides = bench.parse_args(argv)
    d = bench.dist.Dist(0, 0, 1, torch.device("cpu"))
    settings = {"batch": 2, "warmup": 1, "steps": 1, "workers": 0, "num_images": 4}
    return bench.run_table(args, files, overrides, d, settings, lambda rows: None)


def test_train_bench_all_is_rerun_without_a_switch_that_fails(bench, monkeypatch):
    def measure(cfg, stage, *rest):
        if cfg.perf.precision == "bf16":
            raise RuntimeError("bf16 is broken here\nsecond line")
        return {"img_s": 8.0 if cfg.perf.cache_latents else 4.0, "first_step_s": 0.1, "peak_mb": 1.0, "loss": 0.5}

    rows = fake_table(bench, monkeypatch, measure, ["--stages", "encdiff", "--quick"])
    by_name = {r["config"]: r for r in rows}
    assert len(rows) == len(by_name) == len(bench.ROWS)  # the failed "all" was replaced, not added
    assert by_name["bf16"]["status"] == "skipped" and by_name["bf16"]["reason"] == "RuntimeError: bf16 is broken here"
    assert by_name["all"]["status"] == "ok" and "bf16" in by_name["all"]["without"]
    assert by_name["all"]["settings"]["perf.precision"] == "fp32" and by_name["all"]["speedup"] == pytest.approx(2.0)


def test_train_bench_budget_skips_the_rows_that_would_start_late(bench, monkeypatch):
    def measure(*args):
        time.sleep(1.0)  # twice the budget: the first row starts in time even on a loaded machine
        return {"img_s": 1.0, "first_step_s": 0.1, "peak_mb": 1.0, "loss": 0.5}

    rows = fake_table(
        bench, monkeypatch, measure, ["--stages", "encdiff", "--budget", "0.5", "--configs", "baseline,all,bf16"]
    )
    assert [(r["config"], r["status"]) for r in rows] == [("baseline", "ok"), ("all", "skipped"), ("bf16", "skipped")]
    assert all("--budget" in r["reason"] for r in rows[1:])


def test_train_bench_skip_leaves_a_switch_out_of_all(bench, monkeypatch):
    def measure(*args):
        return {"img_s": 1.0, "first_step_s": 0.1, "peak_mb": 1.0, "loss": 0.5}

    rows = fake_table(
        bench, monkeypatch, measure, ["--stages", "encdiff", "--configs", "baseline,all,TF32", "--skip", "bf16,TF32"]
    )
    by_name = {r["config"]: r for r in rows}
    assert by_name["TF32"]["status"] == "skipped" and by_name["TF32"]["reason"] == "--skip"
    assert {"bf16", "TF32"} <= set(by_name["all"]["without"]) and by_name["all"]["status"] == "ok"
    assert by_name["all"]["settings"]["perf.precision"] == "fp32" and by_name["all"]["settings"]["perf.tf32"] is False


def test_train_bench_rejects_bad_arguments(bench):
    for argv in (
        ["--configs", "baseline,nope"],
        ["--stages", "vae"],
        ["--batch", "0"],
        ["--workers=-1"],
        ["--skip", "baseline"],
    ):
        with pytest.raises(UserError):
            bench.parse_args(argv)
    with pytest.raises(UserError, match="perf.compile"):
        bench.make_config([], [("perf.compile", "fast")])


# ---------------------------------------------------------------------------------------------
# gpu_check.sh


def gpu_check(out, **env):
    t0 = time.perf_counter()
    r = run(
        ["bash", str(GPU_CHECK), str(out)], env={**ENV, "GPU_CHECK_WORK": str(out.parent / "work"), **env}, timeout=120
    )
    return r, time.perf_counter() - t0


def summary_rows(stdout):
    """{part: status} from the summary table, which must be the last thing printed."""
    lines = stdout.rstrip().splitlines()
    head = max(i for i, line in enumerate(lines) if line.startswith("| part | status |"))
    rows = lines[head + 2 :]
    assert rows and all(line.startswith("| ") for line in rows)  # nothing after the table
    return {cells[0]: cells[1] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in rows)}


def test_gpu_check_is_valid_bash():
    assert os.access(GPU_CHECK, os.X_OK)
    assert run(["bash", "-n", str(GPU_CHECK)]).returncode == 0
    if shutil.which("shellcheck"):
        r = run(["shellcheck", str(GPU_CHECK)])
        assert r.returncode == 0, r.stdout


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "out"
    r, _ = gpu_check(out, GPU_CHECK_DRY="1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    status = summary_rows(r.stdout)
    assert list(status) == GPU_CHECK_PARTS
    assert all(s == "ok" for p, s in status.items() if p != "wheels")
    log = (out / "log.txt").read_text()
    for command in (
        "-m pytest -q -m gpu",
        f"benchmarks/attn_bench.py --quick --json {out}/attn_bench.json",
        "benchmarks/train_bench.py --quick",
        f"--json {out}/train_bench.json",
        "-m encdiff.data.synth",
        "--grid small",
        "train.py --config config.toml",
        "evaluate.py",
        "--quick",
        "nvidia-smi",
        "--profile",
        "--perf.cuda_graph=false",
    ):
        assert command in log, command
    assert (out / "summary.md").read_text().strip() in r.stdout
    assert len(list(out.rglob("*"))) <= 8  # what a borrowed machine sends back


def test_gpu_check_stops_at_its_budget(tmp_path):
    out = tmp_path / "out"
    budget = 22  # 15 s are kept back for the summary: env gets 7 s, its 7 commands sleep 2 s each
    r, seconds = gpu_check(out, GPU_CHECK_DRY="1", GPU_CHECK_DRY_SLEEP="2", GPU_CHECK_BUDGET=str(budget))
    assert seconds < budget
    assert r.returncode == 1
    status = summary_rows(r.stdout)
    assert list(status) == GPU_CHECK_PARTS
    assert status["wheels"].startswith("skipped: no ")  # no wheels folder: nothing to wait for
    assert status["env"] == "TIMEOUT"  # its commands sleep longer than what the budget leaves it
    assert all(status[p].startswith("skipped") for p in GPU_CHECK_PARTS[2:])
    assert "no time left" in status["gpu_tests"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_gpu_check_without_cuda_skips_the_gpu_parts(tmp_path):
    out = tmp_path / "out"
    r, _ = gpu_check(out, GPU_CHECK_BUDGET="1880")  # env gets 60 s: importing torch on a loaded machine
    assert r.returncode == 1
    status = summary_rows(r.stdout)
    assert status["env"] == "ok"
    assert all(status[p].startswith("skipped: no CUDA device") for p in GPU_CHECK_PARTS[2:])
    env = (out / "env.txt").read_text()
    assert f"torch {torch.__version__}" in env and "env: no CUDA device" in env


def test_code_factor_nmi_finds_which_code_carries_which_factor():
    import numpy as np

    from encdiff.metrics import code_factor_nmi

    nmi_mod = load_script("benchmarks/code_factor_nmi.py")
    sizes = (4, 6)
    rng = np.random.default_rng(0)
    factors = np.stack(np.unravel_index(np.arange(4 * 6), sizes), 1).repeat(40, 0)  # (960, 2): the grid, 40 each
    codes = np.stack(
        [
            factors[:, 1] * 2.0 + 0.01 * rng.standard_normal(len(factors)),  # code 0 = factor 1
            rng.standard_normal(len(factors)),  # code 1: noise
            -3.0 * factors[:, 0],
        ],
        1,
    )  # code 2 = factor 0
    nmi = code_factor_nmi(codes, factors, sizes, bins=20)
    assert nmi.shape == (3, 2)
    assert nmi[0, 1] > 0.99 and nmi[2, 0] > 0.99
    assert nmi[0, 0] < 0.02 and nmi[2, 1] < 0.02 and nmi[1].max() < 0.1
    table = nmi_mod.format_table(nmi, ["a", "b"], codes.std(0))
    assert table.splitlines()[-1].split()[1:] == ["1.00", "1.00"]
    with pytest.raises(ValueError):
        code_factor_nmi(codes, factors[:, :1], sizes)
