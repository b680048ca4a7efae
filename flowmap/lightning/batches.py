"""One place that turns whatever a DataModule yields into (x0, cond)."""

from __future__ import annotations

from torch import Tensor

from flowmap.conditions import Condition, TextCondition, as_condition


def unpack_batch(batch, null: TextCondition | None = None) -> tuple[Tensor, Condition]:
    """Tensor | (x,) | (x, y) | {"x": ..., "y": ...} -> (x0 (B, ...), cond (B,) long, a ``TextCondition`` (prompt
    embeddings, or a dict of a text condition's fields from shards, with ``null``, the empty prompt's condition,
    attached) or None).

    Labels < 0 mean "unconditional": a batch whose labels are all negative gives cond = None."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, dict):
        x, y = batch.get("x"), batch.get("y")
    elif isinstance(batch, (tuple, list)):
        if len(batch) not in (1, 2):
            raise ValueError(f"a batch must be x or (x, y), got a sequence of {len(batch)}")
        x, y = batch[0], (batch[1] if len(batch) == 2 else None)
    else:
        raise ValueError(f"cannot read a batch of type {type(batch).__name__}")
    if x is None:
        raise ValueError("the batch has no 'x'")
    if isinstance(y, (TextCondition, dict)) or (isinstance(y, Tensor) and y.dim() > 1 and y.is_floating_point()):
        return x, as_condition(y).with_null(null)  # prompt embeddings (B, L, D) of a text teacher (flowmap/text.py)
    if y is not None:
        if not isinstance(y, Tensor) or y.dim() != 1:
            y = None
        elif bool((y < 0).all()):
            y = None
        else:
            y = y.long()
    return x, y
