"""The condition record (flowmap/conditions.py) and the text teachers and students that carry it.

- test_text_condition_rows_cat_to: slices and index rows keep every field and the null; cat of the halves is the
  record again (bit-equal); to(float64) casts embeddings, keeps the mask's dtype; mismatched fields raise.
- test_drop_and_uncond: p = 0 returns the record itself; p = 1 gives exactly the empty prompt on every row; p = 0.3
  drops 30% +- 3% of 4000 rows, each row either untouched or the null; labels drop to the null label with the
  same draws as before (torch.rand(B) < p); without a null, uncond and drop raise one clear error.
- test_sd3_teacher_and_student_pass_pooled_projections: a tiny SD3Transformer2DModel teacher on a record with
  pooled embeddings equals the model called directly with pooled_projections (1e-6); the pooled embeddings
  change the velocity; CFG against the record's null is v_u + w (v_c - v_u) (1e-5); the student made from the
  teacher starts as its Euler step (1e-5); a record without pooled embeddings raises.
"""

from __future__ import annotations

import pytest
import torch

from flowmap.conditions import TextCondition, as_condition, batch_size, cat, drop, rows, uncond


def record(B: int = 6, L: int = 5, D: int = 4, P: int = 3, seed: int = 0) -> TextCondition:
    g = torch.Generator().manual_seed(seed)
    null = TextCondition(torch.zeros(1, L, D), torch.zeros(1, P), torch.ones(1, L, dtype=torch.long))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[:, -2:] = 0
    return TextCondition(torch.randn(B, L, D, generator=g) + 1, torch.randn(B, P, generator=g) + 1, mask, null)


def test_text_condition_rows_cat_to():
    c = record()
    assert batch_size(c) == 6 and len(c[1:4]) == 3 and c[2].prompt_embeds.shape == (1, 5, 4)
    idx = torch.tensor([5, 0, 0])
    picked = rows(c, idx)
    assert torch.equal(picked.pooled_embeds, c.pooled_embeds[idx]) and picked.null is c.null
    whole = cat([c[:2], c[2:]])
    for name in ("prompt_embeds", "pooled_embeds", "attention_mask"):
        assert torch.equal(getattr(whole, name), getattr(c, name))
    d = c.to(dtype=torch.float64)
    assert d.prompt_embeds.dtype == torch.float64 and d.null.pooled_embeds.dtype == torch.float64
    assert d.attention_mask.dtype == torch.long
    assert as_condition(c.prompt_embeds).prompt_embeds is c.prompt_embeds and as_condition(None) is None
    labels = torch.tensor([1, 2, 3])
    assert as_condition(labels) is labels and torch.equal(cat([labels[:1], labels[1:]]), labels)
    with pytest.raises(ValueError, match="different fields"):
        cat([c, TextCondition(c.prompt_embeds)])
    with pytest.raises(ValueError, match="attention_mask"):
        TextCondition(c.prompt_embeds, None, torch.ones(6, 3))
    with pytest.raises(ValueError, match="labels with text"):
        cat([labels, c])
    with pytest.raises(TypeError, match="one batch"):
        list(c)


def test_drop_and_uncond():
    c = record()
    assert drop(c, 0.0) is c
    u = drop(c, 1.0)
    assert torch.equal(u.prompt_embeds, torch.zeros(6, 5, 4)) and torch.equal(u.pooled_embeds, torch.zeros(6, 3))
    assert torch.equal(u.attention_mask, torch.ones(6, 5, dtype=torch.long))
    assert torch.equal(uncond(c).prompt_embeds, u.prompt_embeds)
    big = record(B=4000, seed=1)
    d = drop(big, 0.3, generator=torch.Generator().manual_seed(0))
    dropped = (d.prompt_embeds == 0).flatten(1).all(1)
    kept = (d.prompt_embeds == big.prompt_embeds).flatten(1).all(1)
    assert bool((dropped ^ kept).all())  # each row is untouched or the null, never a mix
    assert abs(float(dropped.double().mean()) - 0.3) < 0.03
    assert torch.equal((d.pooled_embeds == 0).all(1), dropped)  # all fields drop together
    labels = torch.arange(10).repeat(100)
    torch.manual_seed(3)
    got = drop(labels, 0.5, num_classes=10)
    torch.manual_seed(3)
    old = torch.where(torch.rand(labels.shape) < 0.5, torch.full_like(labels, 10), labels)  # the former rule
    assert torch.equal(got, old) and torch.equal(uncond(labels, 10), torch.full_like(labels, 10))
    bare = TextCondition(c.prompt_embeds)
    for fn in (lambda: uncond(bare), lambda: drop(bare, 0.5)):
        with pytest.raises(ValueError, match="no null"):
            fn()


def test_sd3_teacher_and_student_pass_pooled_projections():
    from flowmap.diffusers_velocity import DiffusersNet, DiffusersTeacher
    from flowmap.nets.diffusers_net import student_net_from_teacher
    from flowmap.paths import LinearPath
    from flowmap.student import FlowMap

    pytest.importorskip("diffusers")
    from tests.latent_parts import tiny_sd3

    model = tiny_sd3(joint_dim=16, pooled_dim=8, seed=0)
    teacher = DiffusersTeacher(DiffusersNet(model), LinearPath(), "velocity", 1000).eval()
    g = torch.Generator().manual_seed(1)
    null = TextCondition(torch.zeros(1, 7, 16), torch.zeros(1, 8))
    c = TextCondition(torch.randn(3, 7, 16, generator=g), torch.randn(3, 8, generator=g), None, null)
    x, t = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([0.2, 0.5, 0.9])
    with torch.no_grad():
        v = teacher.velocity(x, t, c)
        direct = model(
            x, timestep=t * 1000, encoder_hidden_states=c.prompt_embeds, pooled_projections=c.pooled_embeds
        ).sample
        assert float((v - direct).abs().max()) < 1e-6
        other = TextCondition(c.prompt_embeds, torch.randn(3, 8, generator=g), None, null)
        assert float((teacher.velocity(x, t, other) - v).abs().max()) > 1e-3  # the pooled embeddings are used
        v_u = teacher.velocity(x, t, c.uncond())
        v_w = teacher.velocity(x, t, c, guidance=2.5)
        assert float((v_w - (v_u + 2.5 * (v - v_u))).abs().max()) < 1e-5
        student = FlowMap(student_net_from_teacher(teacher)).eval()
        s, t2 = torch.full((3,), 0.9), torch.full((3,), 0.4)
        euler = x + (t2 - s).view(-1, 1, 1, 1) * teacher.velocity(x, s, c)
        assert float((student(x, s, t2, c) - euler).abs().max()) < 1e-5
    with pytest.raises(ValueError, match="pooled"):
        teacher.velocity(x, t, TextCondition(c.prompt_embeds))


def test_batches_of_embeddings_become_records_with_the_teachers_null():
    """unpack_batch turns shard embeddings (B, L, D) into a TextCondition carrying the null found on the (wrapped)
    teacher by null_of; label dropout (drop_labels, p = 1) then gives that null on every row; labels stay labels."""
    from types import SimpleNamespace

    from flowmap.conditions import null_of
    from flowmap.lightning.batches import unpack_batch
    from flowmap.objectives.common import drop_labels

    c = record()
    wrapped = SimpleNamespace(teacher=SimpleNamespace(null_condition=c.null))
    assert null_of(wrapped) is c.null and null_of(SimpleNamespace(teacher=None)) is None
    # the walk skips an attribute of another type on an outer wrapper; the outermost record wins
    outer = SimpleNamespace(null_condition="not a record", teacher=wrapped)
    assert null_of(outer) is c.null and null_of(SimpleNamespace(null_condition=c, teacher=outer)) is c
    x = torch.randn(6, 4, 8, 8)
    x0, got = unpack_batch((x, c.prompt_embeds), null_of(wrapped))
    assert x0 is x and isinstance(got, TextCondition) and torch.equal(got.prompt_embeds, c.prompt_embeds)
    dropped = drop_labels(got, 0, 1.0)
    assert torch.equal(dropped.prompt_embeds, c.null.prompt_embeds.expand(6, -1, -1))
    _, labels = unpack_batch((x, torch.arange(6)))
    assert torch.equal(labels, torch.arange(6))
