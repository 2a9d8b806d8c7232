"""Training in several processes (`torchrun ... ff train`, docs/scaling.md "Distributed
training"): which rank this process is, and the few collectives the training loop needs.

    torchrun --standalone --nproc-per-node 2 $(which ff) train --store S --layer 8 --out RUN

`ranks_from_env()` reads torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK) and joins the
process group once: gloo for CPU tensors, NCCL for CUDA tensors. Without torchrun it returns
SINGLE, whose collectives do nothing, so one process runs the code it always ran.

Every rank trains on its share of each global batch (the single process's batch), and every
term of L_total is a function of sums over the batch's tokens (squared errors, activation
masses, METHOD §1 and §5). `Ranks.means` adds those sums up over the ranks in the forward pass
and passes gradients straight through in the backward pass, so each rank holds the loss of the
whole global batch and differentiates its own tokens' part of it; `sum_grads_` adds the parts.
This is why no DistributedDataParallel wrapper: the ratios of the per-cluster losses need the
global masses before they are divided, the decoder-norm projection must see the summed
gradient, and the gates' terms are computed whole on every rank.
"""

from __future__ import annotations

import atexit
import os
from typing import Any, Callable, Iterable, TypeVar

import torch
from torch import Tensor

from trainer.errors import TrainError

T = TypeVar("T")


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) forward, identity backward. Everything downstream of it is computed
    identically on every rank (the loss is replicated), so the gradient arriving here is the
    same on every rank, and it is exactly the gradient with respect to this rank's summand."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        import torch.distributed as dist

        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


class Ranks:
    """This process's place among the training processes, and their collectives. With
    world 1 (SINGLE) every method is the identity or a plain local mean."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0):
        self.rank, self.world, self.local_rank = rank, world, local_rank

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes the run folder, logs and shows progress."""
        return self.rank == 0

    def device(self, name: str) -> torch.device:
        """The torch device of `cfg.device` for this rank: under torchrun, "cuda" is
        cuda:LOCAL_RANK (one GPU per process)."""
        dev = torch.device(name)
        if self.world > 1 and dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(dev)
        return dev

    # ---- the training step ---------------------------------------------------------------

    def means(self, rows: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, int]]:
        """Means over dim 0 of each tensor, over the global batch (every rank's rows), and the
        global row counts. Differentiable: each rank's gradient is its rows' part. One process:
        `x.mean(0)` and `len(x)`. One all_reduce for all of them."""
        if self.world == 1:
            return {k: v.mean(0) for k, v in rows.items()}, {k: len(v) for k, v in rows.items()}
        sums = [v.sum(0).reshape(-1) for v in rows.values()]
        counts = sums[0].new_tensor([float(len(v)) for v in rows.values()])
        total = _SumOverRanks.apply(torch.cat([*sums, counts]))
        n = [int(c) for c in total[-len(rows):].detach().tolist()]
        parts = total[:-len(rows)].split([s.numel() for s in sums])
        means = {k: (p / max(c, 1)).reshape(v.shape[1:])
                 for (k, v), p, c in zip(rows.items(), parts, n)}
        return means, dict(zip(rows, n))

    def count(self, n: int) -> int:
        """The sum over ranks of an integer (e.g. a local batch's rows)."""
        if self.world == 1:
            return n
        t = torch.tensor([float(n)], dtype=torch.float64)
        self.sum_(t)
        return int(t.item())

    def sum_grads_(self, params: Iterable[Tensor], *, replicated: Iterable[Tensor] = ()) -> None:
        """After backward: each of `params`' gradients becomes the sum over ranks (each rank
        holds its tokens' part); each of `replicated`'s the mean over ranks (their terms are
        computed whole on every rank; the mean keeps the ranks' copies equal where kernels
        are not bit-reproducible). Gradients that are None: zeros for `params`, left alone for
        `replicated` (no rank has them, e.g. the gates in phase 1)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        params = list(params)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        rep = [p for p in replicated if p.grad is not None]
        works = [dist.all_reduce(p.grad, async_op=True) for p in params + rep]
        for w in works:
            w.wait()
        for p in rep:
            p.grad.div_(self.world)

    # ---- statistics and shared decisions -------------------------------------------------

    def sum_(self, *tensors: Tensor) -> None:
        """Replace each tensor by its sum over ranks, in place, in float64, in one all_reduce
        (the tensors must share a device)."""
        if self.world == 1 or not tensors:
            return
        import torch.distributed as dist

        flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
        dist.all_reduce(flat)
        _unpack(flat, tensors)

    def broadcast_(self, *tensors: Tensor) -> None:
        """Give every rank rank 0's values of these tensors, in place, in one broadcast."""
        if self.world == 1 or not tensors:
            return
        import torch.distributed as dist

        flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
        dist.broadcast(flat, src=0)
        _unpack(flat, tensors)

    def from_main(self, fn: Callable[[], T]) -> T:
        """fn() on rank 0 only, its result on every rank (run-folder decisions: rank 0 alone
        reads and writes the folder). An exception there is raised on every rank: the same
        TrainError (one line for the user), or a RuntimeError naming it."""
        if self.world == 1:
            return fn()
        import torch.distributed as dist

        box: list[Any] = [None]
        error: BaseException | None = None
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except BaseException as e:  # every rank must hear of it, then rank 0 re-raises it
                error, box[0] = e, ("error", isinstance(e, TrainError), type(e).__name__, str(e))
        dist.broadcast_object_list(box, src=0, device=torch.device("cpu"))
        if error is not None:
            raise error
        if box[0][0] == "error":
            _, user, kind, msg = box[0]
            raise TrainError(msg) if user else RuntimeError(f"rank 0 failed: {kind}: {msg}")
        return box[0][1]

    def gather(self, obj: T) -> list[T] | None:
        """Every rank's `obj` on rank 0, in rank order (None on the other ranks)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out


def _unpack(flat: Tensor, tensors: tuple[Tensor, ...]) -> None:
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view(t.shape))


SINGLE = Ranks()
"""One process: every collective is the identity."""


def ranks_from_env() -> Ranks:
    """The ranks of a torchrun launch (WORLD_SIZE > 1), joining the process group on first
    use (gloo for CPU tensors, NCCL for CUDA tensors when CUDA is there); SINGLE otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    import torch.distributed as dist

    if not dist.is_available():
        raise TrainError("this torch build has no torch.distributed; "
                         "run `ff train` without torchrun")
    if not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
        atexit.register(_close)
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def is_main_process() -> bool:
    """Whether this process is rank 0 of a torchrun launch, or alone (for the CLI's output)."""
    return int(os.environ.get("RANK", "0")) == 0


def _close() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
