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


def test_the_seeds_progress_png_draws_every_seed_on_one_axis(tmp_path, tiny_data):
    """run.out_dir/progress.png after each seed: one line per seed (its live metrics so far), none
    for a seed not started yet."""
    import json

    import numpy as np
    from PIL import Image

    import train
    from encdiff.config import parse_args

    cfg = parse_args(train_args(tmp_path, tiny_data, "--run.seeds=0,1,2"))
    scores = lambda f, d: {"factor_vae": {"eval_accuracy": f}, "dci": {"disentanglement": d}}  # noqa: E731
    for seed, rows in ((0, [(1000, 0.3, 0.1), (2000, 0.6, 0.4)]), (1, [(1000, 0.5, 0.2)])):
        stage = tmp_path / f"seed_{seed}" / "encdiff"
        stage.mkdir(parents=True)
        lines = [json.dumps({"step": n // 8, "images_seen": n, **scores(f, d)}) for n, f, d in rows]
        (stage / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    train.plot_seeds(cfg)
    with Image.open(tmp_path / "progress.png") as im:
        drawn = np.asarray(im.convert("RGB")).astype(int)
    assert drawn.shape[1] > drawn.shape[0] and drawn.std() > 1  # two panels side by side, not blank
    # the default colour cycle's first two lines are there (seeds 0 and 1), its third (seed 2) is not
    colours = {tuple(c) for c in drawn.reshape(-1, 3)}
    assert (31, 119, 180) in colours and (255, 127, 14) in colours and (44, 160, 44) not in colours
