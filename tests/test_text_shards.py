"""Text conditions with pooled embeddings and attention masks, written once into latent shards and streamed back.

- test_text_condition_rows_round_trip_through_shards: one-row TextConditions (embeddings, pooled embeddings, a
  0/1 mask) written by write_shards come back bit-equal from read_all (one TextCondition) and, shuffled, from the
  ShardDataModule's loader through unpack_batch (a TextCondition per batch with the given null attached, mask long).
- test_make_shards_with_prompts_for_an_sd3_folder_stores_pooled_embeddings: make_shards --encode SD3_FOLDER
  --prompts writes latents plus prompt and pooled embeddings equal to a direct encode (1e-5); streamed batches
  carry the pooled embeddings to the SD3 teacher, whose guided velocity on them equals the one on the direct
  condition (1e-5).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from flowmap.conditions import TextCondition, null_of
from flowmap.data.shards import read_all, write_shards
from flowmap.lightning.batches import unpack_batch
from flowmap.lightning.streaming import ShardDataModule


def streamed(root, batches: int, batch_size: int, null=None):
    dm = ShardDataModule(str(root), batch_size=batch_size, epoch_length=batches, shuffle_buffer=4)
    dm.setup("fit")
    return [unpack_batch(b, null) for b in dm.train_dataloader()]


def test_text_condition_rows_round_trip_through_shards(tmp_path):
    g = torch.Generator().manual_seed(0)
    N, L, D, P = 7, 5, 6, 3
    x = torch.randn((N, 2, 4, 4), generator=g)
    mask = (torch.rand((N, L), generator=g) > 0.3).long()
    cond = TextCondition(torch.randn((N, L, D), generator=g), torch.randn((N, P), generator=g), mask)
    write_shards(((x[i], cond[i]) for i in range(N)), tmp_path / "s", shape=(2, 4, 4), max_count=3)
    z, back = read_all(tmp_path / "s")
    assert torch.equal(z, x) and isinstance(back, TextCondition)
    assert torch.equal(back.prompt_embeds, cond.prompt_embeds) and torch.equal(back.pooled_embeds, cond.pooled_embeds)
    assert torch.equal(back.attention_mask, mask) and back.attention_mask.dtype == torch.long
    null = TextCondition(torch.zeros(1, L, D), torch.zeros(1, P), torch.ones(1, L, dtype=torch.long))
    seen = 0
    for xb, cb in streamed(tmp_path / "s", 3, 4, null):
        assert isinstance(cb, TextCondition) and cb.null is not None and len(cb) == 4
        for row in range(4):
            i = int(((x - xb[row]).flatten(1).abs().sum(1) == 0).nonzero()[0])  # the sample this row came from
            assert torch.equal(cb.prompt_embeds[row], cond.prompt_embeds[i])
            assert torch.equal(cb.pooled_embeds[row], cond.pooled_embeds[i])
            assert torch.equal(cb.attention_mask[row], mask[i])
            seen += 1
    assert seen == 12
    assert torch.equal(cb.uncond().pooled_embeds, torch.zeros(4, P))  # guidance / dropout see the null's fields


@pytest.mark.slow
def test_make_shards_with_prompts_for_an_sd3_folder_stores_pooled_embeddings(tmp_path):
    from flowmap.text import prompt_encoder_of
    from scripts.make_shards import main as make_shards
    from teachers import CheckpointTeacher
    from tests.latent_parts import sd3_folder
    from tests.test_latent_shards import image_folder

    folder = sd3_folder(tmp_path / "sd3")
    images = image_folder(tmp_path / "images")
    captions = ["a red cat", "two dogs", "", "blue sky 3", "cat", "a b c"]
    (tmp_path / "captions.txt").write_text("\n".join(captions) + "\n")
    args = ["--image-folder", str(images), "--encode", str(folder), "--prompts", str(tmp_path / "captions.txt")]
    make_shards([*args, "--out", str(tmp_path / "lat"), "--max-count", "4", "--batch-size", "4"])
    z, cond = read_all(tmp_path / "lat")
    teacher = CheckpointTeacher(str(folder))
    direct = prompt_encoder_of(teacher).condition(captions)
    assert isinstance(cond, TextCondition) and cond.pooled_embeds.shape == (6, 16) and cond.attention_mask is None
    assert float((cond.prompt_embeds - direct.prompt_embeds).abs().max()) < 1e-5
    assert float((cond.pooled_embeds - direct.pooled_embeds).abs().max()) < 1e-5
    (xb, cb), *_ = streamed(tmp_path / "lat", 1, 3, null_of(teacher))
    rows = [int(((z - xb[r]).flatten(1).abs().sum(1) == 0).nonzero()[0]) for r in range(3)]
    t = torch.full((3,), 0.6)
    with torch.no_grad():
        v = teacher.velocity(xb, t, cb, guidance=2.0)
        ref = teacher.velocity(xb, t, direct[torch.tensor(rows)], guidance=2.0)
    assert float((v - ref).abs().max()) < 1e-5
