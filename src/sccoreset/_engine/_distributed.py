"""Data-parallel helpers on ``torch.distributed``: rank shares of each chunk, gathers, the DDP wrap.

With no process group (or a world of one) every helper is the identity, so the same loop serves one
process. Under ``torchrun`` every rank reads a disjoint, contiguous share of each chunk's rows; per-cell
scores and labels are gathered so every rank runs the same selection; the (small) buffer is replicated
on every rank, and each rank trains on its share of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

Segment = tuple[int, int, int]


def rank_world() -> tuple[int, int]:
    """Rank of this process and the world size; ``(0, 1)`` without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def share(n: int, rank: int, world: int) -> tuple[int, int]:
    """Bounds of rank ``rank``'s contiguous share of ``n`` items (shares differ by at most one)."""
    return n * rank // world, n * (rank + 1) // world


def shard_chunk(segments: Sequence[Segment], rank: int, world: int) -> list[Segment]:
    """Rank ``rank``'s contiguous share of a chunk's rows, as segments of the same files."""
    n = sum(stop - start for _, start, stop in segments)
    lo, hi = share(n, rank, world)
    out, pos = [], 0
    for f, start, stop in segments:
        a, b = max(lo, pos), min(hi, pos + stop - start)
        if a < b:
            out.append((f, start + a - pos, start + b - pos))
        pos += stop - start
    return out


def shard_plan(plan: Sequence[Sequence[Segment]], rank: int, world: int) -> list[list[Segment]]:
    return [shard_chunk(chunk, rank, world) for chunk in plan]


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` for one process)."""
    _, world = rank_world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Rows of ``t`` from every rank concatenated in rank order (ranks may hold different numbers of rows)."""
    _, world = rank_world()
    if world == 1:
        return t
    dev = t.device if dist.get_backend() == "nccl" else torch.device("cpu")
    local = t.to(dev).contiguous()
    counts = torch.tensor([local.shape[0]], device=dev)
    all_counts = [torch.zeros_like(counts) for _ in range(world)]
    dist.all_gather(all_counts, counts)
    sizes = [int(c) for c in all_counts]
    padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=dev)
    padded[: local.shape[0]] = local
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)]).to(t.device)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    _, world = rank_world()
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel when there are several ranks, else ``model`` itself."""
    if rank_world()[1] == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def broadcast_parameters(model: nn.Module, src: int = 0) -> None:
    """Rank ``src``'s parameters and buffers on every rank (what DDP does when it wraps a model)."""
    if rank_world()[1] == 1:
        return
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=src)


def concat_by_rank(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Dicts of per-cell arrays from every rank, concatenated key by key in rank order."""
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
