"""Conditions: what a teacher, a student and the sampler are conditioned on, as one small record per batch.

A condition is ``None`` (unconditional), class labels (B,) long (the null label ``num_classes`` means "no class",
``flowmap.types.null_label``), or a ``TextCondition``: the prompt embeddings a text-to-image denoiser takes,

    prompt_embeds   (B, L, D)   encoder_hidden_states (UNet2DConditionModel, SD3Transformer2DModel, ...)
    pooled_embeds   (B, P)      pooled_projections (SD3-style transformers), or None
    attention_mask  (B, L)      1 = attend, 0 = padding (encoder_attention_mask of a UNet2DConditionModel), or None

together with ``null``, the empty prompt's condition (batch 1), which is the unconditional counterpart for
classifier-free guidance (Ho & Salimans 2022, Eq. 6; diffusers' pipelines guide against the empty prompt) and what
condition dropout replaces rows by (Ho & Salimans 2022, Sec. 3.2).

The functions below treat labels and text records alike, so objectives, the student wrapper, the sampler and
guidance carry a condition through without knowing which kind it is: ``batch_size``, ``rows`` (index or slice the
batch), ``cat``, ``to``, ``drop`` (replace each row by the null with probability p) and ``uncond`` (the null for
every row).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Union

import torch
from torch import Tensor

from flowmap.types import check_labels, null_label
from flowmap.wrapped import wrapped_attribute


@dataclass(frozen=True, eq=False)  # identity equality: tensors have no single truth value
class TextCondition:
    """Prompt embeddings of a batch (see the module docstring for shapes); ``null`` is the empty prompt's record
    (batch 1, its own ``null`` None), needed by ``uncond`` and ``drop``."""

    prompt_embeds: Tensor
    pooled_embeds: Tensor | None = None
    attention_mask: Tensor | None = None
    null: TextCondition | None = None

    def __post_init__(self) -> None:
        e = self.prompt_embeds
        if not isinstance(e, Tensor) or e.dim() != 3 or not torch.is_floating_point(e):
            raise ValueError(f"prompt_embeds must be a (B, L, D) float tensor, got {_describe(e)}")
        B, L = e.shape[:2]
        p, m = self.pooled_embeds, self.attention_mask
        if p is not None and (not isinstance(p, Tensor) or p.dim() != 2 or p.shape[0] != B):
            raise ValueError(f"pooled_embeds must be a (B, P) = ({B}, P) tensor, got {_describe(p)}")
        if m is not None and (not isinstance(m, Tensor) or tuple(m.shape) != (B, L)):
            raise ValueError(f"attention_mask must be a (B, L) = ({B}, {L}) tensor, got {_describe(m)}")
        n = self.null
        if n is not None:
            if n.null is not None or len(n) != 1 or n.prompt_embeds.shape[1:] != e.shape[1:]:
                raise ValueError("a null condition is one row of the same (L, D) without a null of its own")
            if (n.pooled_embeds is None) != (p is None) or (n.attention_mask is None) != (m is None):
                raise ValueError("the null condition must have the same fields (pooled, mask) as the condition")

    def __len__(self) -> int:
        return int(self.prompt_embeds.shape[0])

    @property
    def device(self) -> torch.device:
        return self.prompt_embeds.device

    def __iter__(self):
        raise TypeError("a TextCondition is one batch: take rows with cond[i] or cond[a:b], not by iterating")

    def __getitem__(self, index) -> TextCondition:
        """Rows of the batch: a slice, an int (kept as one row), a (K,) long or (B,) bool tensor."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return replace(
            self,
            prompt_embeds=self.prompt_embeds[index],
            pooled_embeds=_pick(self.pooled_embeds, index),
            attention_mask=_pick(self.attention_mask, index),
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextCondition:
        """Moved to ``device``; the embeddings (not the mask) cast to ``dtype``."""
        return TextCondition(
            self.prompt_embeds.to(device, dtype),
            None if self.pooled_embeds is None else self.pooled_embeds.to(device, dtype),
            None if self.attention_mask is None else self.attention_mask.to(device),
            None if self.null is None else self.null.to(device, dtype),
        )

    def with_null(self, null: TextCondition | None) -> TextCondition:
        """The same rows with ``null`` as the unconditional counterpart (kept when already set or ``null`` is None);
        the null's fields this condition lacks (pooled embeddings, mask: e.g. shards of embeddings only) are left
        out."""
        if self.null is not None or null is None:
            return self
        null = TextCondition(
            null.prompt_embeds,
            None if self.pooled_embeds is None else null.pooled_embeds,
            None if self.attention_mask is None else null.attention_mask,
        )
        return replace(self, null=null.to(self.device, self.prompt_embeds.dtype))

    def uncond(self) -> TextCondition:
        """The empty prompt's condition for every row (B rows), with the same null."""
        if self.null is None:
            raise ValueError(
                "this text condition has no null (empty-prompt) condition: guidance and condition dropout need one "
                "(encode prompts with flowmap.text.PromptEncoder.condition, or attach it with with_null)"
            )
        return self.null.to(self.device)[torch.zeros(len(self), dtype=torch.long, device=self.device)].with_null(
            self.null
        )

    def where(self, keep: Tensor, other: TextCondition) -> TextCondition:
        """Row i from self where keep[i] else from ``other`` (same batch); keep: (B,) bool."""
        k3, k2 = keep.view(-1, 1, 1), keep.view(-1, 1)
        return replace(
            self,
            prompt_embeds=torch.where(k3, self.prompt_embeds, other.prompt_embeds),
            pooled_embeds=None
            if self.pooled_embeds is None
            else torch.where(k2, self.pooled_embeds, other.pooled_embeds),
            attention_mask=None
            if self.attention_mask is None
            else torch.where(k2, self.attention_mask, other.attention_mask),
        )

    def model_kwargs(self, model_class: str, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """The keyword arguments of a diffusers denoiser of class ``model_class`` (embeddings in ``dtype``)."""
        kwargs = {"encoder_hidden_states": self.prompt_embeds.to(dtype)}
        if self.pooled_embeds is not None:
            kwargs["pooled_projections"] = self.pooled_embeds.to(dtype)
        elif model_class == "SD3Transformer2DModel":
            raise ValueError("an SD3Transformer2DModel needs pooled_embeds (pooled_projections) in its condition")
        if self.attention_mask is not None and model_class == "UNet2DConditionModel":
            kwargs["encoder_attention_mask"] = self.attention_mask
        return kwargs

    @staticmethod
    def cat(parts: Sequence[TextCondition]) -> TextCondition:
        """The records' rows one after the other (they share fields; the first one's null is kept)."""
        first = parts[0]
        for p in parts:
            if (p.pooled_embeds is None) != (first.pooled_embeds is None) or (p.attention_mask is None) != (
                first.attention_mask is None
            ):
                raise ValueError("text conditions with different fields (pooled, mask) cannot be concatenated")
        null = next((p.null for p in parts if p.null is not None), None)
        return TextCondition(
            torch.cat([p.prompt_embeds for p in parts]),
            None if first.pooled_embeds is None else torch.cat([p.pooled_embeds for p in parts]),
            None if first.attention_mask is None else torch.cat([p.attention_mask for p in parts]),
            None if null is None else null.to(first.device),
        )


Condition = Union[Tensor, TextCondition, None]


def _pick(x: Tensor | None, index) -> Tensor | None:
    return None if x is None else x[index]


def _describe(x) -> str:
    return f"shape {tuple(x.shape)} {x.dtype}" if isinstance(x, Tensor) else type(x).__name__


def as_condition(cond) -> Condition:
    """A condition from what a data source or a caller holds: None, labels (B,), a TextCondition, prompt
    embeddings (B, L, D), or a dict of a diffusers model's keyword arguments (``encoder_hidden_states``,
    ``pooled_projections``, ``encoder_attention_mask``)."""
    if cond is None or isinstance(cond, TextCondition):
        return cond
    if isinstance(cond, dict):
        return TextCondition(
            cond["encoder_hidden_states"], cond.get("pooled_projections"), cond.get("encoder_attention_mask")
        )
    if isinstance(cond, Tensor) and cond.dim() == 3 and torch.is_floating_point(cond):
        return TextCondition(cond)
    if isinstance(cond, Tensor):
        return cond
    raise ValueError(f"a condition is None, (B,) labels or prompt embeddings, got {type(cond).__name__}")


def batch_size(cond: Condition) -> int | None:
    """B of a condition; None for None."""
    return None if cond is None else len(cond) if isinstance(cond, TextCondition) else int(cond.shape[0])


def rows(cond: Condition, index) -> Condition:
    """The rows ``index`` (slice or index tensor) of a condition; None stays None."""
    return None if cond is None else cond[index]


def cat(parts: Sequence[Condition]) -> Condition:
    """Conditions of several batches as one batch (all None, all labels or all text)."""
    if all(p is None for p in parts):
        return None
    if any(p is None for p in parts):
        raise ValueError("cannot concatenate conditioned and unconditional batches")
    if all(isinstance(p, TextCondition) for p in parts):
        return TextCondition.cat(parts)
    if any(isinstance(p, TextCondition) for p in parts):
        raise ValueError("cannot concatenate labels with text conditions")
    return torch.cat(list(parts))


def to(cond: Condition, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Condition:
    """Moved to ``device``; text embeddings cast to ``dtype`` (labels keep their integer dtype)."""
    if cond is None:
        return None
    return cond.to(device, dtype) if isinstance(cond, TextCondition) else cond.to(device)


def uncond(cond: Condition, num_classes: int = 0) -> Condition:
    """The unconditional counterpart of every row: the null label ``num_classes``, or the empty prompt."""
    if cond is None:
        return None
    if isinstance(cond, TextCondition):
        return cond.uncond()
    return torch.full_like(cond, null_label(num_classes))


def drop(cond: Condition, p: float, num_classes: int = 0, generator: torch.Generator | None = None) -> Condition:
    """Each row replaced by its unconditional counterpart (``uncond``) with probability p: condition dropout for
    classifier-free guidance training (Ho & Salimans 2022, Sec. 3.2). p <= 0 or None returns ``cond`` itself."""
    if cond is None or p <= 0:
        return cond
    B = batch_size(cond)
    keep = torch.rand(B, generator=generator, device=None if generator is not None else _device(cond)) >= p
    keep = keep.to(_device(cond))
    if isinstance(cond, TextCondition):
        return cond.where(keep, cond.uncond())
    return torch.where(keep, cond, uncond(cond, num_classes))


def matches(cond: Condition, null: int = -1) -> Tensor | None:
    """(B, B) bool: row i's condition admits row j's data point, i.e. the two rows hold the same condition (equal
    labels; equal prompt embeddings, pooled embeddings and mask) or row i is unconditional (the label ``null``; a
    text row equal to the record's ``null`` empty-prompt condition). None for None. What a batch-posterior
    estimate conditions on (``flowmap.objectives.common.stable_target``)."""
    if cond is None:
        return None
    if not isinstance(cond, TextCondition):
        return (cond[:, None] == cond[None, :]) | (cond[:, None] == null)
    key = _row_key(cond)
    same = (key[:, None, :] == key[None, :, :]).all(-1)
    if cond.null is not None:
        free = (key == _row_key(cond.null.to(cond.device, cond.prompt_embeds.dtype))).all(-1)
        same = same | free[:, None]
    return same


def _row_key(cond: TextCondition) -> Tensor:
    """(B, K): every tensor of each row flattened side by side (float64, so a mask compares exactly)."""
    parts = [cond.prompt_embeds, cond.pooled_embeds, cond.attention_mask]
    return torch.cat([p.flatten(1).double() for p in parts if p is not None], dim=1)


def _device(cond: Condition) -> torch.device:
    return cond.device


def check(cond: Condition, batch: int, num_classes: int = 0, text: bool = False) -> None:
    """One clear error for a condition that does not fit a model: labels for a label model (``check_labels``), a
    TextCondition (or embeddings) of batch B for a text-conditioned one."""
    if cond is None:
        return
    if not text:
        if isinstance(cond, TextCondition):
            raise ValueError("a text condition (prompt embeddings) was given to a model that takes class labels")
        check_labels(cond, num_classes, batch)
        return
    cond = as_condition(cond)
    if not isinstance(cond, TextCondition):
        raise ValueError("class labels were given to a text-conditioned model: give prompt embeddings")
    if len(cond) != batch:
        raise ValueError(f"the text condition has {len(cond)} rows, the batch {batch}")


def null_of(model) -> TextCondition | None:
    """The empty prompt's condition of a text teacher (``null_condition``, also inside wrappers); None otherwise."""
    return wrapped_attribute(model, "null_condition", TextCondition)
