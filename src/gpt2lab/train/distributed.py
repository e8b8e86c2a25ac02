"""Many processes, one training loop: process-group setup, DDP / FSDP2 wrapping, full state dicts.

Under ``torchrun`` (``WORLD_SIZE`` > 1) each process joins a group (gloo on CPU, NCCL on CUDA). With
``[run] process_group = "always"`` a plain single process forms a group of one, so the wrapped paths
(DDP's buckets and hooks; FSDP2's all-gathers, reduce-scatters and mixed precision; the loop's
collectives) run on a one-GPU box as they would on many: a check of the wiring, not a speed-up.
The model is replicated (DDP) or sharded per block (FSDP2, ``fully_shard``). Checkpoints always hold
*full*, unsharded state dicts keyed by parameter name, so one file format serves one process, DDP
and FSDP, and a run can resume under a different number of processes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel

from gpt2lab.errors import GPT2LabError
from gpt2lab.kernels.lm_head_loss import LanguageModelLoss

# A process group agrees on stopping for a caught signal at every log step and every STOP_CHECK_STEPS-th step.
# Agreeing is an all-reduce and a read of its result, which waits for every kernel queued so far: the one host
# sync a distributed step would otherwise make on every step (the guards read nothing between log steps). A log
# step has just read the device, so there it costs one small collective. Ten keeps the wait off nine steps in
# ten and still stops a GPT-2-sized run within seconds (llm.c's 124M step: 0.3 s on 8 A100s), inside the grace
# between SIGTERM and SIGKILL that schedulers give (30 s by default in Slurm and Kubernetes), checkpoint included.
STOP_CHECK_STEPS = 10


@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device
    # In a process group: the model is wrapped (DDP / FSDP2) and the loop's collectives go through the
    # group, a group of one included: the same calls as on N processes, so a one-process run checks them
    # too (NCCL, for one, refuses a tensor left on the host). ``world`` says how many results combine.
    grouped: bool = False
    store_dir: str | None = None  # a group of one's FileStore folder, removed by teardown

    @property
    def master(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.grouped:
            torch_dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """Average over ranks (gloo has no AVG reduction, so SUM / world)."""
        if not self.grouped:
            return value
        value = value.detach().clone()
        torch_dist.all_reduce(value)
        return value / self.world

    def max(self, value: float) -> float:
        """The largest ``value`` over ranks, on every rank (an all-reduce and a read of its result)."""
        if not self.grouped:
            return value
        t = torch.tensor([float(value)], device=self.device)
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
        return t.item()

    def any(self, flag: bool) -> bool:
        """True on every rank if it is True on one: a non-finite step found by one rank stops all of them at
        the same step (a rank that stopped alone would leave the others waiting in a collective)."""
        return bool(self.max(float(flag)))

    def stop_after(self, step: int, signum: int | None, log_step: bool) -> int | None:
        """The signal that stops the run after ``step``, or None; ``signum``: the one this process caught. Alone, at
        once. In a process group all ranks stop at the same step (one that stopped alone would leave the others
        waiting in a collective), agreed only at log steps and every :data:`STOP_CHECK_STEPS`-th step: steps every
        rank knows alike, so none waits in a collective the others skip. A signal caught in between stays caught
        and stops the run, at a checkpoint, at the next of them. The ranks take the largest signal number any of
        them caught, so a rank stopped by another's signal exits with that signal too."""
        if not self.grouped:
            return signum
        if not (log_step or step % STOP_CHECK_STEPS == 0):
            return None
        return int(self.max(signum or 0)) or None


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def setup(device_name: str = "auto", process_group: str = "auto") -> Dist:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1); with ``process_group =
    "always"``, form a group of one in a single process; otherwise a plain single process, no group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world == 1 and process_group != "always":
        return Dist(rank, world, device)
    if not torch_dist.is_available():
        raise GPT2LabError("this PyTorch build has no torch.distributed: train in one process (process_group = auto)")
    if torch_dist.is_initialized():
        raise GPT2LabError(
            "a process group already exists in this process; gpt2lab forms its own: destroy that one first, "
            "or train in a process of its own"
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    # Bound to its GPU, NCCL connects at once and barriers know the device instead of guessing it.
    device_id = device if device.type == "cuda" else None
    if world > 1:  # torchrun's rendezvous (MASTER_ADDR, MASTER_PORT in the environment)
        torch_dist.init_process_group(backend=backend, device_id=device_id)
        return Dist(rank, world, device, grouped=True)
    # A group of one meets in a file, not on a port: nothing listens on the network, no torchrun variables
    # are needed, and each run's store is fresh (a FileStore must start empty).
    store_dir = tempfile.mkdtemp(prefix="gpt2lab-group-")
    try:
        store = torch_dist.FileStore(os.path.join(store_dir, "store"), 1)
        torch_dist.init_process_group(backend=backend, store=store, rank=0, world_size=1, device_id=device_id)
    except BaseException:
        shutil.rmtree(store_dir, ignore_errors=True)
        raise
    return Dist(0, 1, device, grouped=True, store_dir=store_dir)


def teardown(dist: Dist) -> None:
    """Leave the group (a later run in this process forms its own) and remove a group of one's store."""
    if dist.grouped and torch_dist.is_initialized():
        torch_dist.barrier()  # without it gloo sometimes aborts at exit ("terminate called without ...")
        torch_dist.destroy_process_group()
    if dist.store_dir is not None:
        shutil.rmtree(dist.store_dir, ignore_errors=True)


def wrap_model(
    model: torch.nn.Module, dist: Dist, strategy: str, dtype: torch.dtype = torch.float32, compile: bool = False
) -> tuple[torch.nn.Module, torch.nn.Module, Callable]:
    """``(model, loss, loss_fn)``: the model whose parameters, state dicts and logits the loop uses; the
    module whose ``forward(idx, targets)`` is the training loss (:class:`LanguageModelLoss`), which
    :func:`sync_context` takes; and what each step calls, ``loss`` or ``loss`` compiled.

    DDP replicates the loss module, so its hooks see each step; FSDP2 shards each block of the model,
    then the model, whose :meth:`GPT.hidden_states` (what the loss calls) gathers them just in time.
    Outside a process group the bare model trains.

    With ``compile``, a single process and DDP compile the whole loss module, as nanoGPT compiles its
    model: one graph from token ids to the loss, in which Inductor fuses across block boundaries (a
    block's residual add into the next LayerNorm, the final LayerNorm into the loss) and Dynamo splits
    DDP's graph at its gradient buckets. FSDP2 compiles each block on its own instead: its all-gathers
    and reduce-scatters run in hooks at block boundaries, where a whole-model graph would break anyway,
    and identical blocks share one compiled graph, so compiling takes a fraction of the time. (Which
    of the two steps faster on a GPU is unmeasured.)
    """
    loss = LanguageModelLoss(model)
    if dist.grouped and strategy == "fsdp":
        _shard(model, dist, dtype, compile)
        return model, loss, loss
    if dist.grouped:
        if dist.device.type == "cuda":  # one GPU per process: DDP's module, inputs and outputs live on it
            index = dist.device.index
            loss = DistributedDataParallel(loss, device_ids=[index], output_device=index)
        else:  # CPU modules take no device ids
            loss = DistributedDataParallel(loss)
    return model, loss, torch.compile(loss) if compile else loss


def _shard(model: torch.nn.Module, dist: Dist, dtype: torch.dtype, compile: bool) -> None:
    """FSDP2: each block a unit of its own (compiled first with ``compile``), then the root (embeddings,
    final LayerNorm, the tied LM head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(dist.device.type, (dist.world,))
    # bf16: parameters are gathered and used in bf16 (half the all-gather bytes), gradients are
    # reduce-scattered in fp32. The reduction sums every rank's gradient, and in bf16 (8 bits of
    # mantissa) each addition would round away the small contributions, more with every rank; in fp32
    # the sum is as good as one process's and lands in the fp32 shard that AdamW updates, and gradient
    # accumulation between synced micro-batches happens in fp32 too. Autocast still wraps the step:
    # matrix products in bf16 either way, and on CUDA LayerNorm and softmax are upcast to fp32.
    if dtype == torch.bfloat16:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:  # fp32, or fp16 through autocast: parameters stay fp32 (fp16's loss scaler unscales fp32 gradients)
        policy = MixedPrecisionPolicy()
    for block in model.transformer.h:
        if compile:
            block.compile()  # in place: parameter names and state dicts unchanged
        fully_shard(block, mesh=mesh, mp_policy=policy)
    # Not resharded after forward: the loss reads lm_head.weight (= wte) after hidden_states returns.
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=policy)
    register_fsdp_forward_method(model, "hidden_states")


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
