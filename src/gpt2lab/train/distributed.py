"""Many processes, one training loop: process-group setup, DDP / FSDP2 wrapping, full state dicts.

Under ``torchrun`` (``WORLD_SIZE`` > 1) each process joins a group (gloo on CPU, NCCL on CUDA). The
model is replicated (DDP) or sharded per block (FSDP2, ``fully_shard``). Checkpoints always hold
*full*, unsharded state dicts keyed by parameter name, so one file format serves one process, DDP
and FSDP, and a run can resume under a different number of processes.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel

from gpt2lab.kernels.lm_head_loss import LanguageModelLoss


@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            torch_dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """Average over ranks (gloo has no AVG reduction, so SUM / world)."""
        if not self.active:
            return value
        value = value.detach().clone()
        torch_dist.all_reduce(value)
        return value / self.world

    def any(self, flag: bool) -> bool:
        """True on every rank if it is True on one: a signal caught by one rank stops all of them at the
        same step (a rank that stopped alone would leave the others waiting in a collective)."""
        if not self.active:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
        return bool(t.item())


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def setup(device_name: str = "auto") -> Dist:
    """Join the process group when launched by torchrun; a plain single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch_dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, device)


def teardown(dist: Dist) -> None:
    if dist.active and torch_dist.is_initialized():
        torch_dist.barrier()  # without it gloo sometimes aborts at exit ("terminate called without ...")
        torch_dist.destroy_process_group()


def wrap_model(model: torch.nn.Module, dist: Dist, strategy: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(model, loss)``: the model whose parameters, state dicts and logits the loop uses, and the module
    whose ``forward(idx, targets)`` is the training loss (:class:`LanguageModelLoss`), through which every
    training step runs. DDP replicates the loss module, so its hooks see each step; FSDP2 shards each block
    of the model, then the model, whose :meth:`GPT.hidden_states` (what the loss calls) gathers them just
    in time. A single process trains the bare model."""
    loss = LanguageModelLoss(model)
    if not dist.active:
        return model, loss
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        mesh = init_device_mesh(dist.device.type, (dist.world,))
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        # Not resharded after forward: the loss reads lm_head.weight (= wte) after hidden_states returns.
        fully_shard(model, mesh=mesh, reshard_after_forward=False)
        register_fsdp_forward_method(model, "hidden_states")
        return model, loss
    device_ids = [dist.device.index] if dist.device.type == "cuda" else None
    return model, DistributedDataParallel(loss, device_ids=device_ids)


def sync_context(loss: torch.nn.Module, last: bool):
    """Gradient accumulation: communicate gradients only on the last micro-batch of a step. ``loss`` is
    :func:`wrap_model`'s second result."""
    if isinstance(loss, DistributedDataParallel):
        return nullcontext() if last else loss.no_sync()
    if hasattr(loss.model, "set_requires_gradient_sync"):  # FSDP2
        loss.model.set_requires_gradient_sync(last)
    return nullcontext()


def gather_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full model and optimizer state dicts on CPU (rank 0 holds them; other ranks get empty dicts).

    A collective under FSDP: every rank must call it. An optimizer that has not stepped yet (every step so
    far skipped, as fp16 loss scaling does at first) gives ``{}``: torch would fill its state by stepping it
    with zero gradients, and AdamW's step count of 1 would change the run's next real update.
    """
    sd = _state_dict_api()
    options = sd.StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = sd.get_model_state_dict(model, options=options)  # first: FSDP2's optimizer gathering fails before it
    optim_state = sd.get_optimizer_state_dict(model, optimizer, options=options) if optimizer.state else {}
    return model_state, optim_state


def load_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict) -> None:
    """Load full state dicts (every rank read the same file) into a bare, DDP or FSDP model."""
    sd = _state_dict_api()
    options = sd.StateDictOptions(full_state_dict=True)
    sd.set_model_state_dict(model, model_state, options=options)
    if optim_state:  # {}: saved before the optimizer's first step; the fresh one is that state
        sd.set_optimizer_state_dict(model, optimizer, optim_state, options=options)


def _state_dict_api():
    """torch.distributed.checkpoint's state-dict functions, imported when a checkpoint is first written or
    read: at the top of this module they cost every gpt2lab process (the CLI imports the trainer) about
    47 MiB of resident memory, a prepare worker included."""
    import torch.distributed.checkpoint.state_dict as state_dict_api

    return state_dict_api
