"""encdiff/optim.py: how the learning rate follows the batch (encdiff.lr_scaling) and the warm-up in
images (encdiff.warmup_images), as the stage-2 step uses them."""

import math

import pytest

from conftest import SMOKE
from encdiff.config import build_config
from encdiff.optim import lr_factor, scaled_lr, warmup_steps


@pytest.mark.parametrize("rule, factor", [("linear", 8.0), ("sqrt", math.sqrt(8.0)), ("none", 1.0)])
def test_the_lr_follows_the_batch_by_the_rule(rule, factor):
    cfg = build_config(
        SMOKE, [("encdiff.batch_size", "256"), ("encdiff.lr_ref_batch", "32"), ("encdiff.lr_scaling", rule)]
    )
    assert scaled_lr(cfg.encdiff) == pytest.approx(cfg.encdiff.lr * factor)
    assert scaled_lr(cfg.vqvae) == pytest.approx(cfg.vqvae.lr * cfg.vqvae.batch_size / cfg.vqvae.lr_ref_batch)


def test_a_warmup_in_images_lasts_as_many_images_at_any_batch():
    for batch, steps in ((32, 320), (256, 40), (100, 103)):  # ceil(10240 / batch)
        cfg = build_config(SMOKE, [("encdiff.batch_size", str(batch)), ("encdiff.warmup_images", "10240")])
        assert warmup_steps(cfg.encdiff) == steps
        assert lr_factor(steps - 1, warmup_steps(cfg.encdiff)) < 1.0 == lr_factor(steps, warmup_steps(cfg.encdiff))
    cfg = build_config(SMOKE, [("encdiff.warmup_steps", "7")])
    assert cfg.encdiff.warmup_images == 0 and warmup_steps(cfg.encdiff) == 7  # the release's steps by default


def test_an_unknown_rule_is_one_line():
    from encdiff.errors import UserError

    with pytest.raises(UserError, match="encdiff.lr_scaling: must be one of linear, sqrt, none; got 'cube'"):
        build_config(SMOKE, [("encdiff.lr_scaling", "cube")])
