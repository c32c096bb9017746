import pytest

from conftest import ROOT, train_error
from encdiff.config import Config, build_config, from_toml_text, parse_args, to_toml
from encdiff.errors import UserError


def test_config_toml_lists_the_defaults():
    # config.toml documents every default: it must not drift from the dataclasses
    assert parse_args(["--config", str(ROOT / "config.toml")]) == Config()


def test_every_preset_parses():
    for preset in sorted((ROOT / "configs").glob("*.toml")):
        parse_args(["--config", str(ROOT / "config.toml"), "--config", str(preset)])


def test_fast_preset_keeps_the_default_recipes_images_at_eight_times_the_batch():
    """configs/fast.toml's header: config.toml's warm-up and length in images, the linear rule's lr."""
    from encdiff.optim import scaled_lr, warmup_steps

    default = parse_args(["--config", str(ROOT / "config.toml")])
    fast = parse_args(["--config", str(ROOT / "config.toml"), "--config", str(ROOT / "configs" / "fast.toml")])
    d, f = default.encdiff, fast.encdiff
    assert f.batch_size == 8 * d.batch_size and f.batch_size % 8 == 0  # 128 per GPU on 8
    assert warmup_steps(f) * f.batch_size == warmup_steps(d) * d.batch_size
    assert f.steps * f.batch_size == d.steps * d.batch_size
    assert scaled_lr(f) == pytest.approx(8 * scaled_lr(d)) == pytest.approx(2.048e-3)
    assert fast.eval.stop_at_target and fast.eval.every > 0 and fast.vqvae == default.vqvae


def test_later_files_win_and_overrides_come_last(tmp_path):
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text("[encdiff]\nsteps = 10\nlr = 1e-4\n")
    b.write_text("[encdiff]\nsteps = 20\n")
    cfg = parse_args(["--config", str(a), "--config", str(b), "--encdiff.lr", "3e-4", "--run.stages=encdiff"])
    assert cfg.encdiff.steps == 20 and cfg.encdiff.lr == 3e-4 and cfg.run.stages == ["encdiff"]


def test_cli_values_are_parsed_to_the_field_type():
    cfg = parse_args(
        [
            "--vqvae.betas=0.1,0.2",
            "--perf.channels_last=true",
            "--encdiff.channel_mult=[1,2]",
            "--encdiff.attention_levels=0,1",
            "--eval.metrics",
            "dci,mig",
            "--encdiff.dropout=0",
        ]
    )
    assert cfg.vqvae.betas == [0.1, 0.2] and cfg.perf.channels_last is True
    assert cfg.encdiff.channel_mult == [1, 2] and cfg.eval.metrics == ["dci", "mig"]
    assert isinstance(cfg.encdiff.dropout, float)


def test_round_trip_is_identical():
    cfg = parse_args(["--encdiff.lr=1.234567890123e-4", '--run.out_dir=a "quoted" dir\\x', "--eval.metrics=dci"])
    assert from_toml_text(to_toml(cfg)) == cfg


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--encdiff.stepz=5"], "unknown key encdiff.stepz"),
        (["--nosuch.key=5"], "unknown table [nosuch]"),
        (["--encdiff.steps=ten"], "encdiff.steps: expected int"),
        (["--encdiff.steps=0"], "encdiff.steps: must be positive"),
        (["--encdiff.lr=-1"], "encdiff.lr: must be positive"),
        (["--perf.attention=cuda"], "perf.attention: must be one of"),
        (["--encdiff.schedule=sqrt"], "encdiff.schedule"),
        (["--eval.metrics=fid"], "eval.metrics"),
        (["--config", "/nonexistent.toml"], "config file not found"),
        (["stray"], "unexpected argument"),
    ],
)
def test_bad_input_is_one_clear_error(args, needle):
    with pytest.raises(UserError, match=None) as e:
        parse_args(args)
    assert needle in str(e.value)


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[encdiff]\nsteps = 'many'\n")
    with pytest.raises(UserError, match="bad.toml: encdiff.steps"):
        build_config([bad])
    bad.write_text("[encdiff]\nsteps = -3\n")
    with pytest.raises(UserError, match="bad.toml: encdiff.steps: must be positive"):
        build_config([bad])
    bad.write_text("[encdiff\n")
    with pytest.raises(UserError, match="not valid TOML"):
        build_config([bad])


def test_train_py_reports_config_errors_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "unknown key encdiff.stepz" in train_error("--encdiff.stepz=1")
    assert not (tmp_path / "runs").exists()  # nothing was written before the error


def test_every_key_is_fixed_by_a_checkpoint_or_free_to_change_exactly_once():
    import dataclasses

    from encdiff.config import FREE_KEYS, STAGE_KEYS

    fixed = {f"{t}.{k}" for keys in STAGE_KEYS.values() for t, names in keys.items() for k in names}
    for table in dataclasses.fields(Config):
        for f in dataclasses.fields(table.type):
            key = f"{table.name}.{f.name}"
            free = FREE_KEYS.get(table.name, ())
            is_free = free == "*" or f.name in free
            assert (key in fixed) != is_free, f"{key}: in {'both lists' if is_free else 'neither list'}"
    assert {f"vqvae.{k}" for k in STAGE_KEYS["encdiff"]["vqvae"]} <= {
        f"vqvae.{k}" for k in STAGE_KEYS["vqvae"]["vqvae"]
    }


@pytest.mark.parametrize(
    "override, key",
    [
        ("--encdiff.prediction=x0", "encdiff.prediction"),
        ("--encdiff.loss=l2", "encdiff.loss"),
        ("--run.seed=4", "run.seed"),
    ],
)
def test_resuming_with_another_objective_names_the_key_and_both_values(override, key):
    from encdiff.config import check_resumable

    stored = build_config()
    with pytest.raises(UserError, match=rf"trained with {key} = .*, the config now says .*new run"):
        check_resumable(stored, parse_args([override]), "encdiff", "ckpt")
    check_resumable(
        stored, parse_args(["--encdiff.steps=5", "--perf.compile=off", "--run.log_every=7"]), "encdiff", "ckpt"
    )


def test_a_retired_key_reads_in_a_stored_config_and_explains_itself_elsewhere(tmp_path):
    stored = to_toml(Config()).replace("[eval]\n", "[eval]\nquick = false\n")
    assert from_toml_text(stored) == Config()  # a checkpoint written before the key went
    with pytest.raises(UserError, match="eval.quick no longer exists .*evaluate.py --quick"):
        parse_args(["--eval.quick=true"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--encdiff.timesteps=20"], "eval.ddim_steps: must be between 1 and encdiff.timesteps \\(20\\); got 200"),
        (["--eval.seed=-1"], "eval.seed: must be in"),
        (["--run.seed=-3"], "run.seed: must be in"),
        (["--perf.attention=sdpa_nope"], "perf.attention: must be one of auto, triton, xformers, sdpa, sdpa_flash"),
    ],
)
def test_combinations_and_ranges_fail_up_front(args, message):
    with pytest.raises(UserError, match=message):
        parse_args(args)
    parse_args(["--encdiff.timesteps=20", "--eval.ddim_steps=20"])


def test_config_toml_says_what_a_stop_signal_exits_with():
    line = next(line for line in (ROOT / "config.toml").read_text().splitlines() if line.startswith("stop_signals"))
    assert "exit 0" not in line and "128 + the signal" in line
