"""Training on several processes, on PyTorch's own engines: ``torchrun`` launches, DDP or FSDP2 (``fully_shard``)
synchronise. The engine talks to one :class:`Parallel` object and never to ``torch.distributed`` itself.

How a run is split (the same for both strategies):

- **Data.** Every rank draws the objective's batch stream, which is a deterministic function of (seed, epoch),
  and keeps every ``world_size``-th micro-batch: rank ``r`` trains on micro-batches ``r, r + W, ...``. An epoch is
  seen once in all, no sample twice, and a run on W processes with ``--grad-accum k`` takes exactly the optimizer
  steps of one process with ``--grad-accum W*k`` (``--batch-size`` is per process, as in every PyTorch trainer).
- **Gradients.** The objective's loss runs inside one module (:class:`Objective`) that DDP wraps, or that FSDP2
  shards as its root (each transformer block is sharded on its own), so a loss that calls ``model.forward_hidden``,
  a value head or a generate loop is synchronised like one that calls ``model(x)``.
- **Agreement.** Metrics are averaged over ranks (token counts summed), a step is skipped on every rank when one saw
  a non-finite loss, and a stop (Ctrl-C, SIGTERM, a plugin) ends the run on every rank after the same step.
- **Files.** Only rank 0 writes; under FSDP the weights and optimizer state are gathered for it first, so a
  checkpoint is the same file whatever the number of processes (and ``--resume`` may even change it).
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import time

import torch
import torch.distributed as dist
from torch import nn

from tuneforge.engine import precision
from tuneforge.engine.config import STRATEGIES
from tuneforge.errors import ConfigError
from tuneforge.engine.integrity import weights_digest
from tuneforge.engine.registry import call_impl

__all__ = ["STRATEGIES", "Parallel", "start", "launched", "Objective", "torchrun_command"]


def launched() -> bool:
    """Whether this process was started by torchrun (or anything else that sets the env:// variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def torchrun_command(nproc: str, argv: list[str]) -> list[str]:
    """The torchrun command line that runs ``tuneforge ARGV`` on ``nproc`` processes of this machine."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "tuneforge", *argv]


class Objective(nn.Module):
    """The model and the objective's loss as one module, so DDP or FSDP2 see the whole forward of a micro-batch
    whichever of the model's methods the loss calls."""

    def __init__(self, model: nn.Module, loss_fn, run):
        super().__init__()
        self.model = model
        self._loss_fn, self._run = loss_fn, run

    def forward(self, batch):
        return call_impl(self._loss_fn, model=self.model, batch=batch, run=self._run)


class Parallel:
    """One process (the default): every method is the plain thing, and the base of the distributed strategies."""

    strategy = "single"
    rank, world_size = 0, 1

    def __init__(self, device: torch.device):
        self.device = device
        self.objective: nn.Module | None = None
        self.run = None  # the run being trained, set by wrap()
        self.said_low_loss = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def wrap(self, model: nn.Module, loss_fn, run) -> list[nn.Parameter]:
        """Prepare ``model`` for training with ``loss_fn``; return the parameters to optimise (FSDP2 replaces them
        with sharded ones, so the optimizer must be built from this list)."""
        self.objective = Objective(model, loss_fn, run)
        self.run = run
        return [p for p in model.parameters() if p.requires_grad]

    def loss(self, batch):
        """``(loss, metrics)`` of one micro-batch, its forward under the run's ``--precision`` (autocast for
        bf16-mixed; the caller runs the backward outside it)."""
        with precision.autocast(self.run.config.precision, self.device):
            loss, parts = self.objective(batch)
        self.said_low_loss = self.said_low_loss or precision.say_low_loss(loss, self.run)  # once a run
        return loss, parts

    def accumulate(self, last: bool):
        """Around the forward and backward of a micro-batch: gradients are synchronised only on the ``last``."""
        return contextlib.nullcontext()

    def reduce(self, sums: dict[str, float], finite: bool) -> tuple[dict[str, float], bool]:
        """This rank's metric sums and finiteness -> the run's (sums averaged over ranks, tokens summed; finite
        only where every rank was)."""
        return sums, finite

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (every rank gets the same answer)."""
        return flag

    def gathered(self, model: nn.Module):
        """Around code that uses the model outside the loss (evaluation, rollouts, saving): inside, a plain module
        with whole weights, whatever the strategy. Collective."""
        return contextlib.nullcontext()

    def digest(self, named) -> str:
        """SHA-256 of (name, tensor) pairs as :func:`tuneforge.engine.integrity.weights_digest`, over all ranks' shards."""
        return weights_digest(named)

    def folder_weights(self) -> tuple[set[str], dict] | None:
        """``(names, source)`` of the weights still the model folder's, when the model itself can no longer tell
        (FSDP replaced its parameters); None: ask the model."""
        return None

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer's state_dict with full tensors (collective under FSDP)."""
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)

    def rng_states(self) -> dict[str, torch.Tensor]:
        """Every rank's torch RNG state, for rank 0's checkpoint (collective)."""
        return {"rng.torch": torch.get_rng_state()}

    def set_rng(self, tensors: dict[str, torch.Tensor]) -> None:
        state = tensors.get(f"rng.torch.rank{self.rank}", tensors.get("rng.torch"))
        if state is not None:
            torch.set_rng_state(state)

    def state_bytes(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
        """Bytes of model state this process holds (parameters, their gradients while a step runs, the
        optimizer's tensors); the largest over ranks. What FSDP divides by the number of processes."""
        def local(t):
            t = t.to_local() if hasattr(t, "to_local") else t
            return t.numel() * t.element_size()

        params = list({id(p): p for p in model.parameters()}.values())
        total = sum(local(p) for p in params) + sum(local(p) for p in params if p.requires_grad)
        if optimizer is not None:
            total += sum(local(v) for entry in optimizer.state.values() for v in entry.values()
                         if torch.is_tensor(v) and v.dim() > 0)
        return self._max(total)

    def _max(self, value: int) -> int:
        return value

    def barrier(self) -> None:
        pass

    def close(self, together: bool = True) -> None:
        """End the process group (``together``: after every rank got here)."""


class _Distributed(Parallel):
    """What DDP and FSDP2 share: the process group, agreement and per-rank RNG."""

    def __init__(self, device: torch.device):
        super().__init__(device)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def reduce(self, sums, finite):
        keys = sorted(sums)
        values = torch.tensor([float(not finite)] + [sums[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(values)  # gloo and nccl both sum float64
        out = {k: float(v) if k == "tokens" else float(v) / self.world_size for k, v in zip(keys, values[1:].tolist())}
        return out, values[0].item() == 0

    def any(self, flag):
        value = torch.tensor([float(flag)], dtype=torch.float64, device=self.device)
        dist.all_reduce(value)
        return value.item() > 0

    def digest(self, named):
        mine = weights_digest((n, t.to_local() if hasattr(t, "to_local") else t) for n, t in named)
        every = [None] * self.world_size
        dist.all_gather_object(every, mine)
        return every[0] if len(set(every)) == 1 else hashlib.sha256("".join(every).encode()).hexdigest()

    def rng_states(self):
        every = [None] * self.world_size
        dist.all_gather_object(every, torch.get_rng_state())
        return {"rng.torch": every[0].clone(), **{f"rng.torch.rank{r}": s for r, s in enumerate(every)}}

    def _max(self, value):
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def barrier(self):
        dist.barrier()

    def close(self, together=True):
        if dist.is_initialized():
            if together:  # a rank tearing gloo down while another still talks to it can abort at exit
                dist.barrier()
                # gloo's worker thread frees the barrier's work after it completes, and needs the GIL to do so; a
                # group torn down now (its destructor joins that thread while holding the GIL) can deadlock, as
                # seen on a loaded 2-core machine. Sleeping releases the GIL and lets the thread finish first.
                time.sleep(0.05)
            dist.destroy_process_group()


class DDP(_Distributed):
    """DistributedDataParallel: every rank holds the whole model; gradients are averaged in buckets during
    backward. Unused parameters are allowed (a micro-batch routed to one of several LoRAs leaves the others out)."""

    strategy = "ddp"

    def wrap(self, model, loss_fn, run):
        from torch.nn.parallel import DistributedDataParallel

        params = super().wrap(model, loss_fn, run)
        if params:  # a run that trains nothing (prompting) has nothing to synchronise
            ids = [self.device.index] if self.device.type == "cuda" else None
            # Buffers are computed the same way on every rank (positions, rotary tables): no per-step broadcast.
            # (The keyword was renamed in torch 2.13; both leave the synchronisation at construction.)
            import inspect
            named = "forward_sync_buffers" if "forward_sync_buffers" in \
                inspect.signature(DistributedDataParallel).parameters else "broadcast_buffers"
            self.objective = DistributedDataParallel(self.objective, device_ids=ids, find_unused_parameters=True,
                                                     **{named: False})
        return params

    def accumulate(self, last):
        if last or not isinstance(self.objective, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return self.objective.no_sync()


class FSDP(_Distributed):
    """FSDP2 (``fully_shard``): each block's parameters, gradients and optimizer state are split over the ranks
    and gathered only around that block's forward and backward; the rest (embeddings, head, soft prompts) form the
    root's group. Code that uses the model outside the loss runs inside :meth:`gathered`."""

    strategy = "fsdp"
    folder: tuple[set[str], dict] | None = None  # (names still the model folder's, its identity), at wrap time
    scalars: list[nn.Parameter] = []

    def wrap(self, model, loss_fn, run):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        params = super().wrap(model, loss_fn, run)
        if not params:
            return params
        # Saving leaves out what is still the model folder's; known now, before sharding replaces the tensors.
        folder_weights = getattr(model, "folder_weights", None)
        self.folder = folder_weights() if folder_weights is not None else None
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        # A 0-dim parameter (a reward model's tie strength) cannot be sharded: every rank keeps it whole, and
        # its gradient is averaged in reduce().
        self.scalars = [p for p in model.parameters() if p.dim() == 0]
        for block in getattr(model, "blocks", []):
            fully_shard(block, mesh=mesh, ignored_params=set(self.scalars))
        fully_shard(self.objective, mesh=mesh, ignored_params=set(self.scalars))
        return [p for p in model.parameters() if p.requires_grad]

    def reduce(self, sums, finite):
        grads = [p.grad for p in self.scalars if p.grad is not None]
        if grads:
            flat = torch.stack(grads)
            dist.all_reduce(flat)
            for g, v in zip(grads, flat / self.world_size):
                g.copy_(v)
        return super().reduce(sums, finite)

    def _modules(self):
        from torch.distributed.fsdp import FSDPModule

        return [m for m in self.objective.modules() if isinstance(m, FSDPModule)] if self.objective is not None else []

    def accumulate(self, last):
        root = self.objective
        if last or not hasattr(root, "set_requires_gradient_sync"):
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def no_sync():
            root.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                root.set_requires_gradient_sync(True)
        return no_sync()

    @contextlib.contextmanager
    def gathered(self, model):
        """The model as a plain module with whole weights: every sharded parameter swapped for one holding the
        gathered tensor, and FSDP's forward and state-dict hooks (which would swap the shards back in) set aside.
        Evaluation, rollouts and plugins' save hooks run on it as they would on one process."""
        from torch.distributed.tensor import DTensor

        modules = self._modules()
        if not modules:  # nothing was sharded (a run that trains nothing)
            yield
            return
        for m in modules:
            m.reshard()  # the registered parameters are the shards now
        whole, swapped = {}, []
        for module in model.modules():  # the same order on every rank: the gathers pair up
            for name, p in list(module._parameters.items()):
                if isinstance(p, DTensor):
                    if id(p) not in whole:  # tied weights: one tensor under two names, gathered once
                        whole[id(p)] = nn.Parameter(p.full_tensor().clone(), requires_grad=p.requires_grad)
                    module._parameters[name] = whole[id(p)]
                    swapped.append((module, name, p))
        set_aside = []  # (module, attribute, the hooks as they were)
        for m in self.objective.modules():
            for attr in ("_forward_pre_hooks", "_forward_hooks", "_state_dict_pre_hooks"):
                hooks = getattr(m, attr)
                kept = type(hooks)((k, h) for k, h in hooks.items() if not _fsdp_hook(h))
                if len(kept) != len(hooks):
                    set_aside.append((m, attr, hooks))
                    setattr(m, attr, kept)
        try:
            yield
        finally:
            for m, attr, hooks in set_aside:
                setattr(m, attr, hooks)
            for module, name, p in swapped:
                module._parameters[name] = p

    def folder_weights(self):
        return self.folder  # taken at wrap time: the identities it rests on changed with sharding

    def optimizer_state(self, optimizer):
        from torch.distributed.tensor import DTensor

        sd = optimizer.state_dict()
        state = {pid: {k: v.full_tensor().cpu() if isinstance(v, DTensor) else v for k, v in sorted(entry.items())}
                 for pid, entry in sorted(sd["state"].items())}
        return {"state": state, "param_groups": sd["param_groups"]}

    def load_optimizer_state(self, optimizer, state):
        from torch.distributed.tensor import DTensor, distribute_tensor

        params = [p for g in optimizer.param_groups for p in g["params"]]
        for pid, entry in state["state"].items():
            p = params[int(pid)]
            if isinstance(p, DTensor):
                for k, v in entry.items():
                    if torch.is_tensor(v) and v.shape == p.shape:  # moments: shard them like their parameter
                        entry[k] = distribute_tensor(v.to(self.device), p.device_mesh, p.placements)
        optimizer.load_state_dict(state)


def _fsdp_hook(hook) -> bool:
    """Whether a module hook is FSDP2's own (a method of its per-module state, or its state-dict resharding)."""
    owner = getattr(hook, "__self__", None)
    if owner is not None and type(owner).__name__ == "FSDPState":
        return True
    return getattr(hook, "__qualname__", "").startswith("FSDPParamGroup.")


def _device(name: str, local_rank: int, world_size: int) -> torch.device:
    from tuneforge.engine.assemble import device_of

    if name in ("auto", "cuda") and torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        return device
    device = device_of(name)
    if device.type == "cuda" and world_size > 1:
        raise ConfigError(f"--device {name} under torchrun: every process would use that one GPU; give --device cuda "
                          "(or auto) and each process takes the GPU of its LOCAL_RANK")
    return device


def start(strategy: str = "ddp", device: str = "auto") -> Parallel:
    """The :class:`Parallel` of this process: one process, or a rank of a torchrun job (the process group is
    created here; gloo on CPU, nccl on CUDA).

    :param strategy: ``ddp`` or ``fsdp``; ignored without torchrun.
    :param device: the run's ``--device``; under torchrun ``auto``/``cuda`` mean this rank's GPU.
    """
    from tuneforge.engine.assemble import device_of

    if strategy not in STRATEGIES:
        raise ConfigError(f"--strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    if not launched() or int(os.environ["WORLD_SIZE"]) == 1 and not dist.is_initialized():
        return Parallel(device_of(device))
    world, local = int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    dev = _device(device, local, world)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30),
                                device_id=dev if dev.type == "cuda" else None)
    return (FSDP if strategy == "fsdp" else DDP)(dev)
