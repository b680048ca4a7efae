"""Sharded training (FSDP2, ``torch.distributed.fsdp.fully_shard``) for students and teachers too big for DDP.

    trainer:
      strategy:
        class_path: flowmap.lightning.sharding.FSDPStrategy
        init_args: {activation_checkpointing: false, teacher_dtype: null}   # configs/trainer/fsdp.yaml

``FSDPStrategy`` is Lightning's ``ModelParallelStrategy`` with every rank in one data-parallel (sharding)
group and no tensor parallelism. ``shard_networks(module)`` (the LightningModules' ``configure_model``) shards
each trainable network and its EMA / target copies alike:

* every module of each ``nn.ModuleList`` in the network (DiT blocks, UNet levels) is one FSDP unit, the
  network root another; parameters become ``DTensor`` shards (dim 0 over the ranks). The copies of
  ``ema_pairs()`` get the same layout, so an EMA update (``flowmap.ema.ema_update``) is a local lerp of shards:
  no communication, 1/world of the memory.
* forward-mode AD: the objectives call the ``FlowMap`` wrapper, whose ``net(...)`` call runs FSDP's pre-forward
  all-gather, so the JVP (under ``no_grad``) sees ordinary full parameters and dual inputs; tested against DDP
  in tests/test_fsdp.py for MeanFlow with the default ``forward_ad`` backend.
* the frozen teacher is kept whole on every rank (cast to ``teacher_dtype``; bfloat16 with bf16-mixed): it runs only
  under ``no_grad``, so it holds no gradients or optimizer state; sharding it would all-gather all of its
  weights on every call (1-3 calls per step), i.e. its full size in traffic per call, to save 2 bytes per
  parameter per rank. A 12B-parameter teacher in bf16 needs 24 GB per GPU; beyond that, shard it too
  (not provided here).
* ``activation_checkpointing``: each FSDP unit recomputes its activations in the backward pass
  (``torch.utils.checkpoint``, non-reentrant), the stored activations drop to the units' inputs.
* the export (``gather_full``) builds a whole copy of the EMA from the shards: a collective, every rank calls it.
"""

from __future__ import annotations

import copy

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class FSDPStrategy(ModelParallelStrategy):
    """FSDP2 over all ranks. ``teacher_dtype``: the frozen teacher's dtype per rank (bfloat16 | float16 | float32 |
    None to keep it as built); ``activation_checkpointing``: recompute each unit's activations in the backward."""

    def __init__(
        self,
        activation_checkpointing: bool = False,
        teacher_dtype: str | None = None,
        save_distributed_checkpoint: bool = False,
        **kwargs,
    ) -> None:
        if teacher_dtype is not None and teacher_dtype not in DTYPES:
            raise ValueError(f"teacher_dtype must be one of {sorted(DTYPES)} or null, got {teacher_dtype!r}")
        super().__init__(save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        self.activation_checkpointing = bool(activation_checkpointing)
        self.teacher_dtype = teacher_dtype

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # every rank shards
        self._tensor_parallel_size = 1
        super().setup_environment()


def inner_net(module: nn.Module) -> nn.Module:
    """The raw backbone of a ``FlowMap`` (its ``net``), or the module itself."""
    from flowmap.student import FlowMap

    return module.net if isinstance(module, FlowMap) else module


def _checkpointed(unit: nn.Module) -> None:
    """Make ``unit.forward`` recompute its activations in the backward (non-reentrant checkpoint)."""
    from torch.utils.checkpoint import checkpoint

    forward = unit.forward

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # the JVP / teacher passes: nothing to store
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    unit.forward = run


def shard_net(net: nn.Module, mesh, activation_checkpointing: bool = False) -> nn.Module:
    """``fully_shard`` every module of each ModuleList of ``net``, then ``net`` itself; returns ``net``."""
    from torch.distributed.fsdp import fully_shard

    from flowmap.jvp import view_tangents  # FSDP's pre-forward needs dual inputs with view tangents (see there)

    for lst in [m for m in net.modules() if isinstance(m, nn.ModuleList)]:
        for unit in lst:
            if activation_checkpointing:
                _checkpointed(unit)
            fully_shard(unit, mesh=mesh)
            unit.register_forward_pre_hook(view_tangents, with_kwargs=True, prepend=True)
    fully_shard(net, mesh=mesh)
    net.register_forward_pre_hook(view_tangents, with_kwargs=True, prepend=True)
    return net


def shard_networks(module) -> None:
    """Shard the trainable networks of a flowmap LightningModule and their EMA / target copies (``ema_pairs``),
    cast the frozen teacher; a no-op unless the trainer's strategy is ``FSDPStrategy``. Raises one ValueError
    for trainable parameters outside the sharded networks (their gradients would not be synchronized)."""
    from torch.distributed.tensor import DTensor

    strategy = getattr(getattr(module, "_trainer", None), "strategy", None)
    if not isinstance(strategy, FSDPStrategy) or getattr(module, "_sharded", False):
        return
    mesh = strategy.device_mesh["data_parallel"]
    templates = {}
    for target, source, _ in module.ema_pairs():
        for net in (inner_net(source), inner_net(target)):
            if any(isinstance(p, DTensor) for p in net.parameters()):
                continue
            if net is not inner_net(source):  # a whole-model template (meta) to gather the copy into at export
                templates[id(net)] = copy.deepcopy(net).to("meta")
            shard_net(net, mesh, strategy.activation_checkpointing and net is inner_net(source))
    loose = [n for n, p in module.named_parameters() if p.requires_grad and not isinstance(p, DTensor)]
    if loose:
        raise ValueError(
            f"FSDPStrategy: trainable parameters outside the sharded networks ({loose[:3]}); "
            "train with the ddp strategy (configs/trainer/ddp_cpu.yaml / gpu_bf16.yaml)"
        )
    teacher = getattr(module, "_teacher", None)
    if isinstance(teacher, nn.Module) and strategy.teacher_dtype is not None:
        teacher.to(DTYPES[strategy.teacher_dtype])
    module.__dict__["_shard_templates"] = templates
    module._sharded = True


def gather_full(module, net: nn.Module) -> nn.Module:
    """A whole (unsharded) copy of a network sharded by ``shard_networks`` (collective: call on every rank);
    ``net`` itself when it is not sharded."""
    from torch.distributed.tensor import DTensor

    template = module.__dict__.get("_shard_templates", {}).get(id(inner_net(net)))
    if template is None:
        return net
    full = copy.deepcopy(template).to_empty(device="cpu")
    with torch.no_grad():
        for name, p in inner_net(net).named_parameters():
            full.get_parameter(name).copy_(p.full_tensor() if isinstance(p, DTensor) else p)
        for name, b in inner_net(net).named_buffers():
            full.get_buffer(name).copy_(b)
    if inner_net(net) is net:
        return full
    out = copy.copy(net)  # a FlowMap around the whole network
    out._modules = dict(net._modules, net=full)
    return out
