"""Training: configuration (TOML + ``--set``), the loop, checkpoints that resume exactly.

One process or many (``torchrun``, DDP or FSDP2) run the same code; see :mod:`gpt2lab.distributed`.
Resuming is exact: the checkpoint holds the model, the optimizer, the step (the schedule is a pure
function of it), every RNG state and the batch sampler's own generator, so a stopped and resumed run
draws the same batches and produces the same losses as one that never stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import random
import signal
import time
import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .config import GPT2LabError, GPTConfig, closest_hint
from .data import TokenData, gather_batch, sample_offsets
from .distributed import Dist, gather_state, load_state, setup, sync_context, teardown, wrap_model
from .model import GPT

# ---------------------------------------------------------------------------------------- config

GPT_FIELDS = [f.name for f in dataclasses.fields(GPTConfig) if f.name != "extra"]


def _opt(section: str, default: Any, key: str | None = None, **kw) -> Any:
    """A field with its TOML section (and key, when it differs from the field name)."""
    return field(default=default, metadata={"section": section, "key": key}, **kw)


@dataclass
class TrainConfig:
    """Everything a run needs. The defaults are the demo: a small model on the embedded pydoc corpus.

    In TOML the fields are grouped in sections ``[model] [data] [optim] [batch] [run]``; ``[model]``
    also takes any :class:`GPTConfig` field (``n_layer``, ``pos_encoding``, ``n_kv_head``, ``window``…),
    collected in ``model``. ``block_size`` in ``[batch]`` is the training sequence length; the model's
    context is ``model.block_size`` (the preset's unless set) and must be at least as long.
    """

    # [model]
    preset: str | None = _opt("model", "tiny")
    init_from: str | None = _opt("model", None)  # pretrained checkpoint: fine-tune instead of init
    convert_n_kv_head: int | None = _opt("model", None)  # GQA uptraining: pool K/V heads of init_from
    model: dict = field(default_factory=lambda: {"n_layer": 4, "n_embd": 128}, metadata={"section": "model"})
    # [data]
    data_dir: str = _opt("data", "data/pydoc", key="dir")
    # [optim]
    lr: float = _opt("optim", 1e-3)
    min_lr: float = _opt("optim", 1e-4)
    warmup_iters: int = _opt("optim", 25)
    max_iters: int = _opt("optim", 250)
    lr_decay_iters: int | None = _opt("optim", None)  # None: max_iters
    weight_decay: float = _opt("optim", 0.1)
    betas: list = field(default_factory=lambda: [0.9, 0.95], metadata={"section": "optim", "key": None})
    grad_clip: float = _opt("optim", 1.0)  # 0 disables
    # [batch]
    batch_size: int = _opt("batch", 8)  # sequences per micro-batch per process
    block_size: int = _opt("batch", 64)
    grad_accum: int = _opt("batch", 1)  # micro-batches per step, in total over all processes
    # [run]
    out_dir: str = _opt("run", "runs/demo")
    eval_interval: int = _opt("run", 125)
    eval_iters: int = _opt("run", 5)
    ckpt_interval: int = _opt("run", 125)
    log_interval: int = _opt("run", 1)
    seed: int = _opt("run", 1337)
    dtype: str = _opt("run", "auto")  # auto | float32 | bfloat16 (autocast)
    compile: bool = _opt("run", False)
    device: str = _opt("run", "auto")
    strategy: str = _opt("run", "ddp")  # ddp | fsdp, used under torchrun

    def validate(self) -> None:
        choices = {"dtype": ("auto", "float32", "bfloat16"), "strategy": ("ddp", "fsdp")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise GPT2LabError(f"config: {name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("max_iters", "batch_size", "block_size", "grad_accum", "eval_iters", "ckpt_interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise GPT2LabError(f"config: {name} must be a positive integer, got {value!r}")
        if self.preset is None and self.init_from is None and not self.model:
            raise GPT2LabError("config: [model] needs a preset, init_from or the model's fields")
        if self.init_from is not None and self.model:
            raise GPT2LabError(
                f"config: with init_from the model's shape comes from the checkpoint; remove {', '.join(self.model)}"
            )
        if self.convert_n_kv_head is not None and self.init_from is None:
            raise GPT2LabError("config: convert_n_kv_head converts a pretrained model; set init_from too")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _keys() -> dict[str, dict[str, str]]:
    """section → {TOML key: field name}."""
    sections: dict[str, dict[str, str]] = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name != "model":
            sections.setdefault(f.metadata["section"], {})[f.metadata["key"] or f.name] = f.name
    return sections


def _set(cfg: TrainConfig, section: str | None, key: str, value: Any) -> None:
    sections = _keys()
    if section is not None and section not in sections:
        raise GPT2LabError(f"config: unknown section [{section}]{closest_hint(section, sections)}")
    candidates = [section] if section else list(sections)
    for sec in candidates:
        if key in sections[sec]:
            setattr(cfg, sections[sec][key], value)
            return
    if "model" in candidates and key in GPT_FIELDS:  # a bare block_size is the batch's, set above
        cfg.model[key] = value
        return
    home = [sec for sec in sections if key in sections[sec] or (sec == "model" and key in GPT_FIELDS)]
    if home:
        raise GPT2LabError(f"config: '{key}' belongs in [{home[0]}], not [{section}]")
    known = [k for keys in sections.values() for k in keys] + GPT_FIELDS
    where = f" in [{section}]" if section else ""
    raise GPT2LabError(f"config: unknown key '{key}'{where}{closest_hint(key, known)}")


def _parse_value(text: str) -> Any:
    """A ``--set`` value is read as TOML (numbers, booleans, lists, quoted strings), else as a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """The defaults, updated by a TOML file, then by ``key=value`` / ``section.key=value`` overrides."""
    cfg = TrainConfig()
    if path is not None:
        try:
            doc = tomllib.loads(Path(path).read_text())
        except tomllib.TOMLDecodeError as e:
            raise GPT2LabError(f"{path}: invalid TOML ({e})") from None
        if "model" in doc:  # a file's [model] replaces the default shape rather than merging into it
            cfg.model = {}
        for section, table in doc.items():
            if not isinstance(table, dict):
                raise GPT2LabError(f"{path}: '{section}' must be a [section]; keys go inside one")
            for key, value in table.items():
                _set(cfg, section, key, value)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise GPT2LabError(f"--set expects key=value, got {item!r}")
        section, _, name = key.strip().rpartition(".")
        _set(cfg, section or None, name, _parse_value(value.strip()))
    cfg.validate()
    return cfg


# ---------------------------------------------------------------------------------------- checkpoint files

CKPT_MAGIC = b"GPT2LAB-TRAIN-CKPT v1 sha256="
CKPT_NAME = "ckpt.pt"


def save_checkpoint(path: str | Path, payload: dict) -> None:
    """Write via a temporary file, fsync and ``os.replace``: a crash mid-write (even ``kill -9``)
    leaves the previous checkpoint intact. The header line carries a SHA-256 of the payload."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(CKPT_MAGIC + hashlib.sha256(data).hexdigest().encode() + b"\n")
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(len(CKPT_MAGIC)) == CKPT_MAGIC


def load_checkpoint(path: str | Path) -> dict:
    """Verify the checksum before unpickling anything, then load tensors only (``weights_only``)."""
    path = Path(path)
    header, _, data = path.read_bytes().partition(b"\n")
    if not header.startswith(CKPT_MAGIC):
        raise GPT2LabError(f"{path} is not a gpt2lab training checkpoint (bad header); it was not loaded")
    if hashlib.sha256(data).hexdigest().encode() != header[len(CKPT_MAGIC) :]:
        raise GPT2LabError(f"checkpoint {path} is corrupted (checksum mismatch); it was not loaded")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def model_from_checkpoint(path: str | Path) -> GPT:
    """The model of a training checkpoint (for eval/generate on a run still in progress)."""
    ckpt = load_checkpoint(path)
    model = GPT(GPTConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model


def _rng_state(data_gen: torch.Generator) -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        # numpy's state holds an ndarray, which weights_only refuses: store it as a tensor
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "rest": list(np_state[2:])},
        "python": random.getstate(),
        "data": data_gen.get_state(),
    }


def _restore_rng(state: dict, data_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(("MT19937", state["numpy"]["keys"].numpy().astype(np.uint32), *state["numpy"]["rest"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    data_gen.set_state(state["data"])


# ---------------------------------------------------------------------------------------- helpers


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup_iters``, cosine decay to ``min_lr`` at ``lr_decay_iters``, then flat."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    if step >= decay_iters:
        return cfg.min_lr
    progress = (step - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: biases and LayerNorm gains are not shrunk toward 0.

    The fused kernel (one pass over each tensor) is used on CUDA and CPU: on 2 CPU threads it steps
    124M parameters in 0.07 s against 0.5 s for the multi-tensor (foreach) path, which is kept elsewhere.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fast = {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), **fast)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` picks bfloat16 autocast where the hardware runs it natively: CUDA with bf16 support, or
    a CPU with AVX-512 BF16 / AMX. Elsewhere bf16 runs through generic kernels, many times slower than
    fp32 (20x for a small GPT on a 2-core AVX2 CPU): asking for it there gives a warning."""
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
    else:
        native = device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    if name == "auto":
        return torch.bfloat16 if native else torch.float32
    if name == "bfloat16" and not native:
        warnings.warn(
            f"bfloat16 autocast on this {device.type} has no native bf16 matrix multiply and runs many times "
            "slower than float32 (dtype = 'auto' picks float32 here)",
            stacklevel=2,
        )
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def build_model(cfg: TrainConfig, vocab_size: int) -> GPT:
    """From scratch (preset + fields), or from a pretrained checkpoint, optionally GQA-converted."""
    if cfg.init_from is not None:
        model = GPT.from_pretrained(cfg.init_from)
        if cfg.convert_n_kv_head is not None:
            model = model.convert_to_gqa(cfg.convert_n_kv_head)
        return model
    fields = {"vocab_size": vocab_size, **cfg.model}
    config = GPTConfig.from_preset(cfg.preset, **fields) if cfg.preset else GPTConfig.from_dict(fields)
    return GPT(config)


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    """Training and validation loss against step, from metrics.jsonl (Agg canvas: no display needed)."""
    from matplotlib.figure import Figure

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train, strict=True), label="train", lw=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)


# ---------------------------------------------------------------------------------------- the loop


class Trainer:
    """One training run. Every process of a distributed run builds one; only rank 0 logs and writes."""

    def __init__(self, cfg: TrainConfig, dist: Dist, resume: bool = False) -> None:
        self.cfg, self.dist = cfg, dist
        self.out = Path(cfg.out_dir)
        self.ckpt_path = self.out / CKPT_NAME
        self.metrics_path = self.out / "metrics.jsonl"
        device = dist.device
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.dtype = resolve_dtype(cfg.dtype, device)
        if cfg.grad_accum % dist.world:
            raise GPT2LabError(
                f"grad_accum ({cfg.grad_accum}) must be a multiple of the number of processes ({dist.world}) "
                "so that the global batch stays the same"
            )
        self.accum = cfg.grad_accum // dist.world

        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        random.seed(cfg.seed)
        self.data_gen = torch.Generator().manual_seed(cfg.seed)  # batch sampling: same on every rank

        self.data = TokenData.open(cfg.data_dir)
        model = build_model(cfg, vocab_size=self.data.meta["vocab_size"])
        self.model_config = model.config
        if self.data.meta["vocab_size"] > model.config.vocab_size:
            raise GPT2LabError(
                f"{cfg.data_dir} has a vocabulary of {self.data.meta['vocab_size']} tokens but the model has "
                f"{model.config.vocab_size}; it was made with another tokenizer"
            )
        if cfg.block_size > model.config.block_size:
            raise GPT2LabError(
                f"batch block_size ({cfg.block_size}) is longer than the model context ({model.config.block_size})"
            )
        self.data.check_fits(cfg.block_size)

        self.step = 0
        resume_state = None
        if resume:
            if not self.ckpt_path.is_file():
                raise GPT2LabError(f"nothing to resume: {self.ckpt_path} does not exist")
            resume_state = load_checkpoint(self.ckpt_path)
            saved, now = resume_state["model_config"], model.config.to_dict()
            diff = [f"{k}: {saved.get(k)!r} vs {now.get(k)!r}" for k in now if saved.get(k) != now.get(k)]
            if diff:
                raise GPT2LabError(
                    f"{self.out} holds a run of a different model ({'; '.join(diff)} in checkpoint vs config)"
                )

        self.wrapped = wrap_model(model.to(device), dist, cfg.strategy)
        self.optimizer = make_optimizer(self.wrapped, cfg, device)
        if resume_state is not None:
            load_state(self.wrapped, self.optimizer, resume_state["model"], resume_state["optimizer"])
            _restore_rng(resume_state["rng"], self.data_gen)
            self.step = resume_state["step"]
        self.model = torch.compile(self.wrapped) if cfg.compile else self.wrapped
        self.resumed = resume_state is not None
        self.stop_signal: int | None = None

    # -------------------------------------------------------------- pieces
    def autocast(self):
        return torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16)

    def train_step(self) -> torch.Tensor:
        """One optimizer step on the global batch; returns this rank's mean micro-batch loss (detached).

        All ranks draw the same global batch offsets from the shared generator and each takes its own
        slice of micro-batches, so N processes see exactly the batch one process would.
        """
        cfg, device = self.cfg, self.dist.device
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        offsets = sample_offsets(len(self.data.train), cfg.block_size, cfg.grad_accum * cfg.batch_size, self.data_gen)
        mine = offsets.view(cfg.grad_accum, cfg.batch_size)[
            self.dist.rank * self.accum : (self.dist.rank + 1) * self.accum
        ]
        total = torch.zeros((), device=device)
        for i, micro in enumerate(mine):
            x, y = (t.to(device) for t in gather_batch(self.data.train, micro, cfg.block_size))
            with sync_context(self.wrapped, last=i == self.accum - 1), self.autocast():
                _, loss = self.model(x, y, return_logits=False)
            (loss / self.accum).backward()
            total += loss.detach()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.wrapped.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total / self.accum

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over ``eval_iters`` batches of each split. The batches come from a generator seeded
        the same way every time, so evaluations are comparable and never disturb the training RNG."""
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.model.eval()
        result = {}
        for split in ("train", "val"):
            tokens = getattr(self.data, split)
            losses = []
            for _ in range(cfg.eval_iters):
                offsets = sample_offsets(len(tokens), cfg.block_size, cfg.batch_size, gen)
                x, y = (t.to(self.dist.device) for t in gather_batch(tokens, offsets, cfg.block_size))
                with self.autocast():
                    _, loss = self.model(x, y, return_logits=False)
                losses.append(loss.item())
            result[f"{split}_loss"] = sum(losses) / len(losses)
        self.model.train()
        result["val_ppl"] = math.exp(min(result["val_loss"], 50.0))
        return result

    def checkpoint(self) -> dict:
        """Gather the full model/optimizer state (a collective under FSDP) and, on rank 0, write it."""
        model_state, optim_state = gather_state(self.wrapped, self.optimizer)
        if self.dist.master:
            payload = {
                "format": "gpt2lab-train",
                "version": 1,
                "step": self.step,
                "model": model_state,
                "optimizer": optim_state,
                "model_config": self.model_config.to_dict(),
                "train_config": self.cfg.to_dict(),
                "rng": _rng_state(self.data_gen),
            }
            save_checkpoint(self.ckpt_path, payload)
        self.dist.barrier()
        return model_state

    def log(self, row: dict) -> None:
        if self.dist.master:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def _prepare_metrics(self) -> None:
        """A fresh run starts a new metrics file; a resumed one drops rows newer than its checkpoint
        (work lost by a crash), so the file reads as one uninterrupted run."""
        if not self.dist.master:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        kept = []
        if self.resumed and self.metrics_path.is_file():
            rows = [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]
            kept = [r for r in rows if r["step"] <= self.step]
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        (self.out / "train_config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n")

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signum

    # -------------------------------------------------------------- run
    def run(self) -> dict:
        cfg, dist = self.cfg, self.dist
        self._prepare_metrics()
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        tokens_per_step = cfg.grad_accum * cfg.batch_size * cfg.block_size
        losses: list[tuple[int, float]] = []
        last_eval: dict[str, float] = {}
        stop, model_state = False, None
        bar = tqdm(total=cfg.max_iters, initial=self.step, unit="step", disable=not dist.master, dynamic_ncols=True)
        try:
            if self.step == 0 and not self.resumed:
                last_eval = self.evaluate()
                self.log({"step": 0, **last_eval})
            while self.step < cfg.max_iters:
                t0 = time.perf_counter()
                loss = self.train_step()
                if self.step % cfg.log_interval == 0 or self.step == cfg.max_iters:
                    value = dist.mean(loss).item()
                    dt = time.perf_counter() - t0
                    losses.append((self.step, value))
                    self.log({"step": self.step, "loss": value, "lr": lr_at(self.step - 1, cfg), "dt": dt})
                    bar.set_postfix(loss=f"{value:.4f}", tok_s=f"{tokens_per_step / dt:,.0f}")
                bar.update(1)
                if self.step % cfg.eval_interval == 0 or self.step == cfg.max_iters:
                    last_eval = self.evaluate()
                    self.log({"step": self.step, **last_eval})
                    bar.write(f"step {self.step}: train {last_eval['train_loss']:.4f}, val {last_eval['val_loss']:.4f}")
                stop = dist.any(self.stop_signal is not None)
                if stop or self.step % cfg.ckpt_interval == 0 or self.step == cfg.max_iters:
                    model_state = self.checkpoint()
                if stop:
                    break
        finally:
            bar.close()
            for s, h in handlers.items():
                signal.signal(s, h)
        if self.step == cfg.max_iters or stop:
            self._export(model_state)
        return {
            "out_dir": str(self.out),
            "step": self.step,
            "losses": losses,
            "stopped": bool(stop),
            "signal": self.stop_signal,
            **last_eval,
        }

    def _export(self, model_state: dict | None) -> None:
        """The model in gpt2lab format (config.json + model.safetensors) and the loss curve, for
        ``gpt2lab generate/eval --model RUN_DIR``."""
        if model_state is None:  # nothing trained in this session (resumed a finished run)
            model_state, _ = gather_state(self.wrapped, self.optimizer)
        if self.dist.master:
            plain = GPT(self.model_config)
            plain.load_state_dict(model_state)
            plain.save_pretrained(self.out)
            plot_losses(self.metrics_path, self.out / "loss.png")
        self.dist.barrier()


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Run ``cfg`` (in this process, or as one rank under torchrun); returns a summary on every rank."""
    dist = setup(cfg.device)
    try:
        return Trainer(cfg, dist, resume).run()
    finally:
        teardown(dist)
