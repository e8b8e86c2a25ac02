"""Models from any folder or run: what every ``--model`` argument, the evaluations and the harness load.

A training checkpoint file, a run folder (the newer of its exported model and its checkpoint, so a run
in progress loads too), or anything :meth:`GPT.from_pretrained` reads (gpt2lab and hub-layout folders,
hub ids, OpenAI TF checkpoints). The checkpoint file itself is read by
:mod:`gpt2lab.checkpoints.train_state`; this module only builds the model from it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gpt2lab.checkpoints.train_state import read_run_weights, run_checkpoint
from gpt2lab.config import parse_dtype
from gpt2lab.kernels.inference import apply_inference_kernels
from gpt2lab.model import GPT
from gpt2lab.tokenizer import Tokenizer, check_model_vocab, load_tokenizer


def load_model(
    path: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None
) -> GPT:
    """The model at ``path`` (see the module's docstring), cast to ``dtype`` (a ``torch.dtype`` or a name
    such as ``"bf16"``) and moved to ``device`` when given."""
    checkpoint = run_checkpoint(path)
    if checkpoint is None:
        return GPT.from_pretrained(path, dtype=dtype, device=device)
    config, state = read_run_weights(checkpoint)
    model = GPT(config)
    model.load_state_dict(state)
    dtype = parse_dtype(dtype)
    return model.to(device=device, dtype=dtype) if dtype is not None or device is not None else model


def load_model_and_tokenizer(
    path: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None
) -> tuple[GPT, Tokenizer]:
    """:func:`load_model` for inference: in eval mode, cast to ``dtype`` with the kernels that win for that
    dtype swapped in (:func:`gpt2lab.kernels.apply_inference_kernels`; ``dtype="int8"`` quantizes the fp32
    weights), and the tokenizer stored beside it (GPT-2's BPE where none is), checked to fit."""
    model = apply_inference_kernels(load_model(path, device=device), dtype)
    tokenizer = load_tokenizer(path)
    check_model_vocab(tokenizer, model.config.vocab_size, path)
    return model, tokenizer
