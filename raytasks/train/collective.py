"""What the DDP workers agree on: all-reduced flags, sums and statistics, gathered objects, weight hashes."""

from __future__ import annotations

import hashlib
import math

import torch


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def all_have(flag: bool, device: torch.device) -> bool:
    """True when every worker has a batch: the epoch ends for all as soon as one shard runs dry, so that
    DDP's collective calls stay matched even if a worker dropped undecodable images."""
    dist = _dist()
    if dist is None:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def all_sum(values: list[float], device: torch.device) -> list[float]:
    dist = _dist()
    if dist is None:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.cpu().tolist()


def reduce_stats(stats: dict, device: torch.device) -> dict:
    """Sum every worker's validation statistics (``{output: {name: tensor}}``) with one all-reduce, so that
    all workers hold the statistics of the whole validation set. A worker that saw no rows of an output
    contributes zeros (the layout is agreed on first)."""
    dist = _dist()
    if dist is None:
        return stats
    layout = sorted((o, k, tuple(v.shape)) for o, s in stats.items() for k, v in s.items())
    layouts: list = [None] * dist.get_world_size()
    dist.all_gather_object(layouts, layout)
    union = sorted(set().union(*map(set, layouts)))
    local = {(o, k): v for o, s in stats.items() for k, v in s.items()}
    flat = torch.cat([local[(o, k)].reshape(-1).double().cpu() if (o, k) in local
                      else torch.zeros(math.prod(shape), dtype=torch.float64)
                      for o, k, shape in union]) if union else torch.zeros(0, dtype=torch.float64)
    flat = flat.to(device)
    dist.all_reduce(flat)
    flat = flat.cpu()
    out: dict = {}
    pos = 0
    for o, k, shape in union:
        size = math.prod(shape)
        out.setdefault(o, {})[k] = flat[pos: pos + size].reshape(shape).clone()
        pos += size
    return out


def gather(obj) -> list:
    dist = _dist()
    if dist is None:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def tensors_sha(tensors) -> str:
    """A short hash of ``(name, tensor)`` pairs: equal on two workers iff their values are equal."""
    h = hashlib.sha256()
    for name, t in tensors:
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def weights_sha(model) -> str:
    return tensors_sha(model.named_parameters())


_NORM_STATS = ("running_mean", "running_var", "num_batches_tracked")


def state_buffers_sha(model) -> str:
    """Hash of the buffers that hold model state (DMM-CNN's λ and τ), leaving out normalisation statistics,
    which each DDP worker updates from its own batch between DDP's broadcasts."""
    return tensors_sha((n, b) for n, b in model.named_buffers() if not n.endswith(_NORM_STATS))


# --- checkpoints ---------------------------------------------------------------------------------------
