"""flowmap.time_sampling: each law of ``LAWS`` draws what it says (moments of 200k draws), the pairs are ordered,
the gap law draws its gap, and a bad name is one clear error."""

from __future__ import annotations

import pytest
import torch

from flowmap.time_sampling import LAWS, PairSampler, draw, lognormal

N = 200_000


def test_each_law_has_its_moments():
    torch.manual_seed(0)
    u = draw("uniform", N, mean=5.0, std=9.0)  # uniform takes no parameters
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0 and abs(float(u.mean()) - 0.5) < 0.005
    for kind in ("logit_normal", "lognormal"):  # both: log(t / (1 - t)) ~ N(mean, std^2)
        t = draw(kind, N, mean=-0.4, std=1.3).double()
        z = torch.log(t / (1 - t))
        assert abs(float(z.mean()) + 0.4) < 0.02 and abs(float(z.std()) - 1.3) < 0.02, kind
    sigma = lognormal(N, p_mean=-1.2, p_std=1.2, dtype=torch.float64)
    assert sigma.dtype == torch.float64 and abs(float(sigma.log().mean()) + 1.2) < 0.02
    assert abs(float(sigma.log().std()) - 1.2) < 0.02


def test_pairs_are_ordered_and_the_gap_law_draws_the_gap():
    torch.manual_seed(1)
    for kind in (*LAWS, "gap_logit_normal"):
        s, t = PairSampler(kind, 0.3, 0.8).pair(N)
        assert bool((s >= t).all()) and float(t.min()) >= 0.0 and float(s.max()) <= 1.0 + 1e-6, kind
    s, t = PairSampler("gap_logit_normal", 0.3, 0.8).pair(N)
    gap = (s - t).double()
    z = torch.log(gap / (1 - gap))
    assert abs(float(z.mean()) - 0.3) < 0.02 and abs(float(z.std()) - 0.8) < 0.02
    s, t = PairSampler("uniform").pair(N)  # the max and min of two uniforms: means 2/3 and 1/3
    assert abs(float(s.mean()) - 2 / 3) < 0.005 and abs(float(t.mean()) - 1 / 3) < 0.005


def test_a_bad_name_is_one_clear_error():
    with pytest.raises(
        ValueError, match=r"unknown time distribution 'beta'; choose from \['logit_normal', 'lognormal'"
    ):
        draw("beta", 4)
    with pytest.raises(ValueError, match="unknown time distribution 'gap_logit_normal'"):
        draw("gap_logit_normal", 4)  # a law of pairs, not of one time
    with pytest.raises(ValueError, match="'gap_logit_normal', 'logit_normal'"):
        PairSampler("beta")


def test_denoising_draws_its_times_from_the_law_it_is_given():
    """DenoisingLoss takes a law's name (mean 0, std 1) or a PairSampler with its parameters; a law of pairs is
    refused when the loss is built."""
    from flowmap.objectives.denoising import DenoisingLoss, sample_training_times

    torch.manual_seed(2)
    loss = DenoisingLoss(time_sampling=PairSampler("logit_normal", -0.4, 1.3))
    t = sample_training_times(N, torch.device("cpu"), loss.times, t_min=0.0).double()
    z = torch.log(t / (1 - t))
    assert (
        loss.time_sampling == "logit_normal" and abs(float(z.mean()) + 0.4) < 0.02 and abs(float(z.std()) - 1.3) < 0.02
    )
    assert DenoisingLoss(time_sampling="lognormal").times == PairSampler("lognormal", 0.0, 1.0)
    with pytest.raises(ValueError, match="unknown time distribution 'gap_logit_normal'"):
        DenoisingLoss(time_sampling="gap_logit_normal")


@pytest.mark.parametrize("name", ["meanflow", "ayf_emd", "ayf_lmd", "fmsd_eulerian", "fmsd_progressive", "ctm"])
def test_end_share_ends_the_first_rows_at_the_data_and_equal_share_keeps_the_last(name):
    """``end_share`` 0.25 and ``equal_share`` 0.25 of a batch of 64: rows [0, 16) jump to t = 0 from the law's s,
    rows [48, 64) have t = s, the middle keeps the law's ordered pairs; s is the law's on every row (the same draws
    as without the shares, from the same seed)."""
    from flowmap.objectives import build_objective

    x0 = torch.randn(64, 2)
    plain = build_objective({"name": name, "equal_share": 0.0} if name != "ctm" else {"name": name})
    shared = {"name": name, "end_share": 0.25} | ({"equal_share": 0.25} if name != "ctm" else {})
    obj = build_objective(shared)
    torch.manual_seed(3)
    s0, t0, _ = plain.sample_times(64, x0)
    torch.manual_seed(3)
    s, t, _ = obj.sample_times(64, x0)
    assert obj.end_rows(64) == 16 and torch.equal(s, s0)
    assert float(t[:16].abs().max()) == 0.0 and float(s[:16].min()) > 0.0
    if name != "ctm":
        assert torch.equal(t[48:], s[48:]) and torch.equal(t[16:48], t0[16:48])
    assert bool((t <= s).all()) and bool((t[16:48] > 0).all())


def test_end_share_must_leave_room_for_the_equal_share():
    from flowmap.objectives import build_objective

    for bad in ({"end_share": -0.1}, {"end_share": 1.5}, {"end_share": 0.5, "equal_share": 0.75}):
        with pytest.raises(ValueError, match="end_share"):
            build_objective({"name": "meanflow", **bad})
