"""run.seeds: one run per seed in run.out_dir/seed_N; with run.parallel = "seeds" under torchrun each
process trains its own seeds (no DDP), and each seed equals the same seed trained alone."""

import torch

from conftest import final, run_train, train_args, train_error, train_in_process


def assert_same(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_train_two_seeds_each_as_alone(tmp_path, tiny_data, straight):
    out = tmp_path / "seeds"
    r = run_train(out, tiny_data, "--run.seeds=0,1", "--run.parallel=seeds", nproc=2)
    assert f"done: {out / 'seed_0'}" in r.stdout and f"done: {out / 'seed_1'}" in r.stdout
    alone = tmp_path / "alone_1"
    run_train(alone, tiny_data, "--run.seed=1")
    for stage in ("vqvae", "encdiff"):
        assert_same(final(out / "seed_0", stage), final(straight, stage))  # the straight run is seed 0
        assert_same(final(out / "seed_1", stage), final(alone, stage))
    assert not torch.equal(final(alone, "encdiff")["scale_factor"], final(straight, "encdiff")["scale_factor"])


def test_one_process_trains_the_seeds_in_turn_and_a_rerun_skips_them(tmp_path, tiny_data, straight, capsys):
    out = tmp_path / "seeds"
    run_train(out, tiny_data, "--run.seeds=0,1", "--run.stages=vqvae")
    assert_same(final(out / "seed_0", "vqvae"), final(straight, "vqvae"))
    assert (out / "seed_1" / "vqvae").is_dir() and "seed = 1" in (out / "seed_1" / "config.toml").read_text()
    assert train_in_process(*train_args(out, tiny_data, "--run.seeds=0,1", "--run.stages=vqvae")) == 0
    assert capsys.readouterr().out.count("vqvae: finished already") == 2


def test_seed_mistakes_are_one_line(tmp_path, tiny_data, monkeypatch):
    assert "run.parallel: 'seeds' needs run.seeds" in train_error(
        *train_args(tmp_path / "r", tiny_data, "--run.parallel=seeds")
    )
    assert "run.seeds: must not repeat a seed" in train_error(*train_args(tmp_path / "r", tiny_data, "--run.seeds=1,1"))
    monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun --nproc_per_node=3 sets it
    message = train_error(*train_args(tmp_path / "r", tiny_data, "--run.seeds=0,1", "--run.parallel=seeds"))
    assert message == "run.parallel = 'seeds': 2 seeds for 3 processes; give each process a seed"
    assert not (tmp_path / "r").exists()
