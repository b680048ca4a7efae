"""The batch-posterior target (``flowmap.objectives.common.stable_target``) on text conditions.

- test_stable_target_on_text_records_equals_the_label_version: prompts [A, B, A, "", B] encoded by a tiny text
  teacher's own encoder give the same target as labels [0, 1, 0, null, 1] (bit-equal): rows match when their whole
  record (embeddings, pooled, mask) is equal, and the empty-prompt row matches every row; without a null the empty
  prompt is one more condition (= labels with no null); the target differs from the unconditioned one.
- test_consistency_training_from_data_with_stf_on_the_text_teacher: iCT from data with ``data_velocity="stf"`` on
  text records (before: the record was indexed like labels and raised) trains two steps to finite losses and
  moves the student's weights.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from flowmap.conditions import TextCondition, matches
from flowmap.objectives.common import stable_target
from flowmap.text import prompt_encoder_of
from teachers import CheckpointTeacher
from tests.latent_parts import text_folder

PROMPTS = ["a red cat", "blue", "a red cat", "", "blue"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return CheckpointTeacher(str(text_folder(tmp_path_factory.mktemp("sd") / "sd")))


def test_stable_target_on_text_records_equals_the_label_version(teacher):
    cond = prompt_encoder_of(teacher).condition(PROMPTS)
    assert cond.null is not None
    g = torch.Generator().manual_seed(0)
    x0, eps = 0.1 * torch.randn((5, 4, 8, 8), generator=g), torch.randn((5, 4, 8, 8), generator=g)
    s = torch.full((5,), 0.95)  # near noise, with close data points: the posterior spreads over the batch
    x_s = (1 - s)[:, None, None, None] * x0 + s[:, None, None, None] * eps
    labels = torch.tensor([0, 1, 0, 2, 1])
    got = stable_target(x_s, s, x0, eps, cond)
    assert torch.equal(got, stable_target(x_s, s, x0, eps, labels, null=2))
    bare = TextCondition(cond.prompt_embeds, cond.pooled_embeds, cond.attention_mask)  # no null record
    assert torch.equal(stable_target(x_s, s, x0, eps, bare), stable_target(x_s, s, x0, eps, labels, null=-1))
    assert torch.equal(matches(cond), matches(labels, 2)) and int(matches(cond).sum()) == 9 + 5 - 1
    assert float((got - stable_target(x_s, s, x0, eps)).abs().max()) > 1e-3  # the conditions restrict the posterior


def test_consistency_training_from_data_with_stf_on_the_text_teacher(teacher):
    from flowmap.models import student_from_teacher
    from flowmap.objectives import build_objective
    from flowmap.training import fit

    cond = prompt_encoder_of(teacher).condition(PROMPTS)
    student = student_from_teacher(teacher)
    before = [p.detach().clone() for p in student.parameters()]
    objective = build_objective({"name": "ict", "data_velocity": "stf"})
    data = torch.randn((5, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    losses = fit(student, objective, lambda step: (data, cond), steps=2, lr=1e-3)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert sum(float((p.detach() - q).abs().sum()) for p, q in zip(student.parameters(), before)) > 0
