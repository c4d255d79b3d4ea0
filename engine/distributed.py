"""The process group as the trainer sees it: reductions over ranks (identities in one process) and the
DDP / FSDP2 wrapping of the models it trains.

    dist = Distributed(device)             # rank and world size from torch.distributed, or (0, 1)
    dist.sum(x), dist.max(x), dist.mean(x), dist.std(x), dist.whiten(x), dist.gather(x)

Every stage that needs a batch statistic (advantage whitening, step metrics, the update's averages) takes this
object, so one process and N processes run the same code path and N processes compute what one process would
on the concatenated batch.

Gradient reduction: the losses are divided by the *global* token (or sequence) count, so gradients are summed,
not averaged, over ranks (``data_parallel`` installs a sum hook on DDP; ``fully_shard_policy`` sets FSDP2's
divide factor to 1).
"""

from __future__ import annotations

import inspect
import math
import os
from pathlib import Path

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

from .models import backbone_of, hidden_states


def resolve_device(spec: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (this process's GPU when CUDA is there: ``LOCAL_RANK`` under
    torchrun, else the CPU); a CUDA device asked for on a machine without CUDA is a clear error."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be cpu, cuda, cuda:N or auto, got {spec!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} was asked for but CUDA is not available (use --device cpu or auto)")
    return dev


def init_distributed() -> None:
    """Under torchrun (WORLD_SIZE > 1): join the process group (nccl on CUDA, gloo otherwise)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend)


def shutdown_distributed() -> None:
    """Leave the process group at the end of a run. A barrier comes first: a gloo worker thread frees the tensors of
    the last collective it ran, which needs the GIL, while the group's destructor (run when the last reference goes,
    often a DDP reducer's, later) joins those threads holding the GIL; torchrun ranks on loaded CPUs hung there at
    exit. The barrier waits with the GIL released, so the workers are idle when the group goes."""
    if not torch.distributed.is_initialized():
        return
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def available_cpus(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """CPUs this process may use: its affinity mask, capped by the cgroup CPU quota (v2 ``cpu.max`` or v1
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, rounded up). A container limited to 2 CPUs on a 64-core host
    sees 64 cores; torch's default of one thread per core then makes every step many times slower."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    root = Path(cgroup_root)
    quota = period = None
    try:
        fields = (root / "cpu.max").read_text().split()
        if fields and fields[0] != "max":
            quota, period = float(fields[0]), float(fields[1]) if len(fields) > 1 else 100000.0
    except (OSError, ValueError, IndexError):
        try:
            quota = float((root / "cpu" / "cpu.cfs_quota_us").read_text())
            period = float((root / "cpu" / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            pass
    if quota is not None and period and quota > 0:
        n = min(n, math.ceil(quota / period))
    return max(1, n)


def default_threads() -> int:
    """Intra-op threads per process: ``available_cpus`` shared among torchrun's processes on this node, less
    the share other processes keep busy (the 1-minute load average over the visible cores). OpenMP threads
    spin at every barrier: one descheduled thread stalls the rest, so on a shared machine fewer threads are
    faster (a tiny model on 2 busy cores: 11.5 s per step with 2 threads, 0.12 s with 1)."""
    local = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1), 1)
    n = available_cpus()
    try:
        busy = os.getloadavg()[0] / (os.cpu_count() or 1)  # host-wide, as a fraction of the visible cores
    except (AttributeError, OSError):
        busy = 0.0
    free = math.floor(n * max(0.0, 1.0 - busy) + 0.5)
    return max(1, min(n, free) // local)


def warn_if_oversubscribed(device: torch.device) -> None:
    """Warn when torch runs more CPU threads than this process may use: OpenMP threads then spin against each
    other and a step can be many times slower. Not changed here: a process-wide setting belongs to the caller
    (``fusedrl train`` picks it itself)."""
    cpus = available_cpus() if torch.device(device).type == "cpu" else None
    if cpus is not None and torch.get_num_threads() > cpus:
        import warnings

        warnings.warn(f"torch uses {torch.get_num_threads()} CPU threads but this process may run on {cpus} CPUs "
                      "(affinity mask, cgroup quota): OpenMP threads then spin against each other and a step can be "
                      "many times slower; call torch.set_num_threads(fusedrl.engine.distributed.default_threads())",
                      RuntimeWarning, stacklevel=3)  # fmt: skip


def full_state(model: nn.Module, optimizer, sharded: bool) -> tuple[dict, dict]:
    """(model, optimizer) state dicts; ``sharded`` (FSDP): gathered from every rank's shards onto rank 0's CPU (a
    collective: every rank calls it), the other ranks getting empty dicts."""
    if not sharded:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint import state_dict as dcp_state

    full = dcp_state.StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (dcp_state.get_model_state_dict(model, options=full),
            dcp_state.get_optimizer_state_dict(model, optimizer, options=full))  # fmt: skip


def load_full_state(model: nn.Module, optimizer, model_state: dict, optimizer_state: dict, sharded: bool) -> None:
    """Load full state dicts; ``sharded`` (FSDP): every rank holds the full state and keeps its own shards of it."""
    if not sharded:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint import state_dict as dcp_state

    full = dcp_state.StateDictOptions(full_state_dict=True)
    dcp_state.set_model_state_dict(model, model_state, options=full)
    dcp_state.set_optimizer_state_dict(model, optimizer, optimizer_state, options=full)


class Distributed:
    """Rank, world size and reductions over every rank of the default process group (identities without one).

    Tensors are reduced where they are (NCCL) or through the CPU (gloo) and come back on their own device;
    Python numbers come back as floats."""

    def __init__(self, device: torch.device | str = "cpu", *, single: bool = False):
        """``single=True``: this process alone (every reduction an identity) even inside a process group."""
        self.device = torch.device(device)
        if not single and torch.distributed.is_available() and torch.distributed.is_initialized():
            self.rank, self.world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            self.rank, self.world_size = 0, 1

    @property
    def comm_device(self) -> torch.device:
        return self.device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")

    def _all_reduce(self, x, op):
        if self.world_size == 1:
            return x if isinstance(x, torch.Tensor) else float(x)
        if isinstance(x, torch.Tensor):
            t = x.detach().to(self.comm_device, copy=True)
            torch.distributed.all_reduce(t, op=op)
            return t.to(x.device)
        t = torch.tensor([float(x)], dtype=torch.float64, device=self.comm_device)
        torch.distributed.all_reduce(t, op=op)
        return float(t)

    def sum(self, x):
        """Elementwise sum over ranks of a tensor (same shape everywhere) or a number."""
        return self._all_reduce(x, torch.distributed.ReduceOp.SUM if self.world_size > 1 else None)

    def max(self, x):
        """Elementwise max over ranks of a tensor or a number."""
        return self._all_reduce(x, torch.distributed.ReduceOp.MAX if self.world_size > 1 else None)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x`` (any length along dim 0) concatenated in rank order, on ``x``'s device."""
        if self.world_size == 1:
            return x
        return torch.cat(self.gather_objects(x.detach().cpu())).to(x.device)

    def gather_objects(self, obj) -> list:
        """Every rank's picklable ``obj``, in rank order (small CPU data only: it goes through pickle)."""
        if self.world_size == 1:
            return [obj]
        parts = [None] * self.world_size
        torch.distributed.all_gather_object(parts, obj)
        return parts

    def on_rank0(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` run by rank 0 alone (e.g. preparing the output directory, which may delete an
        old run); its result, or the exception it raised, comes back on every rank."""
        answer = None
        if self.rank == 0:
            try:
                answer = ("ok", fn(*args, **kwargs))
            except Exception as e:  # noqa: BLE001 - re-raised on every rank below
                answer = ("error", e)
        kind, value = self.gather_objects(answer)[0]
        if kind == "error":
            raise value
        return value

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def mean(self, x: torch.Tensor) -> float:
        """Mean over every rank's elements (NaN when there are none). Host sync."""
        x = x.detach().double().reshape(-1)
        n = self.sum(float(x.numel()))
        return self.sum(float(x.sum())) / n if n else float("nan")

    def std(self, x: torch.Tensor) -> float:
        """Population std over every rank's elements (NaN when there are none). Host sync."""
        x = self.gather(x.detach().double().reshape(-1))
        return float(x.std(unbiased=False)) if x.numel() else float("nan")

    def whiten(
        self,
        x: torch.Tensor,  # (...) float
        mask: torch.Tensor | None = None,  # (...) bool or 0/1 like x; None = every element
        *,
        shift_mean: bool = True,
        eps: float = 1e-8,
    ) -> torch.Tensor:
        """``(x - mean) / sqrt(var + eps)`` with the mean and population variance over the masked-in elements of
        every rank (two passes, each one all-reduce of a 0-dim tensor, no host sync). ``shift_mean=False`` keeps
        the mean; masked-out elements come back as 0. float32 result (float64 stays float64)."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        x = x.detach().to(dtype)
        m = torch.ones_like(x) if mask is None else mask.detach().to(dtype)
        count = self.sum(m.sum()).clamp(min=1.0)
        mean = self.sum((x * m).sum()) / count
        var = self.sum((m * (x - mean) ** 2).sum()) / count
        out = (x - mean) * torch.rsqrt(var + eps)
        if not shift_mean:
            out = out + mean
        return out * m

    # --------------------------------------------------------------------------------------------------
    # Model wrapping
    # --------------------------------------------------------------------------------------------------
    def data_parallel(self, module: nn.Module) -> nn.Module:
        """``module`` under DistributedDataParallel with summed gradients when there are several ranks."""
        if self.world_size == 1:
            return module
        # No buffer broadcast before every forward: the only buffers are constants (rotary frequencies).
        # Newer torch renamed the flag (the old name still works but warns).
        params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
        no_buffer_sync = {"forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers": False}
        ddp = nn.parallel.DistributedDataParallel(
            module, device_ids=[self.device] if self.device.type == "cuda" else None, **no_buffer_sync
        )
        ddp.register_comm_hook(None, _allreduce_sum_hook)
        return ddp


class PolicyBody(nn.Module):
    """The policy's forward as the fused loss needs it: packed hidden states (1, N, H), not logits.

    It holds the whole policy, so its parameters (what DDP reduces) include the lm_head that the fused loss
    applies outside this forward: the head's gradient comes from the same backward, so DDP's per-parameter
    hook fires for it as for any other and it is all-reduced with the rest."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, input_ids, position_ids, **attn_kwargs):  # (1, N), (1, N) -> (1, N, H)
        return hidden_states(self.policy, input_ids, position_ids=position_ids, **attn_kwargs)

    def run(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``: generation or scoring, which use the policy outside ``forward``; with FSDP it
        runs under the root's forward hooks (``fully_shard_policy`` registers it as a forward method)."""
        return fn(*args, **kwargs)

    def run_gathered(self, fn, *args, gather: bool = True, **kwargs):
        """``run`` with the full weights gathered once for the whole call (FSDP; a plain call otherwise): ranks
        run different numbers of forwards there (their own rollouts), so a per-forward all-gather would not
        match up across ranks. ``gather=False``: ``fn`` runs no forward of the policy (a rollout engine with its
        own copy of the weights), and the shards stay as they are."""
        if not gather:
            return fn(*args, **kwargs)
        if not isinstance(self, FSDPModule):
            return fn(*args, **kwargs)
        units = [m for m in self.modules() if isinstance(m, FSDPModule)]
        layers = [m for m in units if m is not self]
        for m in layers:
            m.set_reshard_after_forward(False, recurse=False)
        for m in units:
            m.unshard()
        try:
            return self.run(fn, *args, **kwargs)
        finally:
            for m in units:
                m.reshard()
            for m in layers:
                m.set_reshard_after_forward(True, recurse=False)


def fully_shard_policy(body: PolicyBody) -> None:
    """FSDP2 in place: each decoder layer is its own unit, the root holds the rest (embeddings, final norm, head).
    Gradients are summed over ranks like DDP's here (the losses already have the global denominator)."""
    layers = [m for child in backbone_of(body.policy).children() if isinstance(child, nn.ModuleList) for m in child]
    if not layers:
        raise ValueError(
            f"PPOConfig.fsdp=True needs a policy whose body has its decoder layers in an nn.ModuleList; "
            f"{type(body.policy).__name__} has none"
        )
    for layer in layers:
        fully_shard(layer)
    # The root (embeddings, norm, head) stays gathered after its forward: the fused loss reads the head weight
    # after the forward returns.
    fully_shard(body, reshard_after_forward=False)
    # Root hooks around run() too, so that the first call (generation) makes the body the FSDP root.
    register_fsdp_forward_method(body, "run")
    for m in body.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no PREMUL_SUM


def _allreduce_sum_hook(process_group, bucket):
    """DDP communication hook: sum gradients over ranks (DDP's default averages). Each rank's loss is
    already divided by the global token count, so the sum is the full-batch gradient."""
    group = process_group if process_group is not None else torch.distributed.group.WORLD
    work = torch.distributed.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])
