"""Multi-process healing on torch's FSDP2 (`fully_shard`), one process per rank under `torchrun`.

    replicate  every rank holds the whole model; each decoder layer is an FSDP2 unit on a (world, 1) mesh,
               i.e. hybrid sharding with one shard: parameters replicated, gradients all-reduced (DDP's job)
    shard      each decoder layer (and each original attention module that the student no longer holds) is
               sharded over all ranks: a rank keeps 1/world of the student's frozen weights and of the teacher's

Embeddings, the final norm and the LM head stay replicated: the loss calls the head's weight directly, and
no adapter trains there. Gradients are summed, not averaged (`set_gradient_divide_factor(1)`): the losses are
normalised by global token counts, so P processes match one process with the same global batch.
Checkpoints and snapshots hold full tensors (gathered on every rank, written by rank 0): any world size
resumes any other's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..util import resolve_device

PARALLEL = ("replicate", "shard")


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mode: str = "replicate"  # how a multi-process run holds the model (PARALLEL)
    units: list = field(default_factory=list)  # the FSDP2 modules (distribute)

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_dist(device: str, mode: str = "replicate") -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device)
    if world <= 1:
        return Dist(0, 1, torch.device(device), mode)
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), dev, mode)


def distribute(h, d: Dist) -> None:
    """Put the hybrid's decoder layers (and the teacher's unshared attention modules) under FSDP2."""
    if d.world <= 1:
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    shape, names = ((d.world, 1), ("replicate", "shard")) if d.mode == "replicate" else ((d.world,), ("shard",))
    mesh = init_device_mesh(d.device.type, shape, mesh_dim_names=names)
    units = []
    for layer in h.layers:  # attention first: stage 1 calls it on its own, outside its layer
        if any(True for _ in layer.self_attn.parameters()):
            units.append(layer.self_attn)
        units.append(layer)
    student = {id(p): layer.self_attn for layer in h.layers for p in layer.self_attn.parameters()}
    in_layers = {id(p) for layer in h.layers for p in layer.parameters()}
    for i, (attn, norm) in h.originals.items():
        for m in (attn, norm):
            params = list(m.parameters())
            own = [p for p in params if id(p) not in in_layers]
            if own and len(own) < len(params):
                raise RuntimeError(f"{type(m).__name__} shares some parameters with the student: cannot shard it")
            if own:
                units.append(m)  # the teacher's alone (the attention a `none` layer dropped)
            elif m is attn and params:  # the teacher's projections are the student attention's (LoRA's base layers)
                owner = student[id(params[0])]
                m.register_forward_pre_hook(lambda mod, args, owner=owner: owner.unshard())
                m.register_forward_hook(lambda mod, args, out, owner=owner: owner.reshard())
    for m in units:
        fully_shard(m, mesh=mesh)
        m.set_gradient_divide_factor(1.0)  # sums: the losses are already normalised by global counts
        m.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no pre-multiplied sum)
    for layer in h.layers:
        # The runner calls each layer on its own, so each is an FSDP2 root, which keeps its weights gathered
        # after forward; gather them again in backward instead, as for any other unit (memory).
        layer.register_forward_hook(lambda mod, args, out: mod.reshard())
    d.units = units


def reshard(d: Dist) -> None:
    """Every FSDP2 unit back to its shards, so that a module's parameters are the sharded ones (what the
    optimiser and the checkpoints hold)."""
    for m in d.units:
        m.reshard()


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded (DTensor) one, gathered on every rank; others unchanged. Collective."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def load_full(p: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a full tensor into parameter p, keeping only this rank's shard when p is sharded."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        if isinstance(p, DTensor):
            p.copy_(distribute_tensor(value.to(p.device, p.dtype), p.device_mesh, p.placements))
        else:
            p.copy_(value)


def shard_like(p: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` (full) laid out as parameter p is (a DTensor of p's placements when p is sharded)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(p, DTensor) and value.dim() > 0:
        return distribute_tensor(value.to(p.device), p.device_mesh, p.placements)
    return value


def all_reduce(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


def barrier(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()
