"""Reading and writing GPT-2 checkpoints in the four formats people actually have.

* **Hugging Face hub ids** and **hub-layout folders** (``config.json`` + ``model.safetensors``, sharded
  safetensors or ``pytorch_model.bin``): :mod:`.locate` finds them, :mod:`.hf` reads and writes them;
  :mod:`.hf_variants` exports RoPE, GQA and MQA models as the transformers architectures that compute them.
* **OpenAI's TensorFlow checkpoints** (``hparams.json``, ``model.ckpt.index``, ``model.ckpt.data-*``),
  read without TensorFlow: :mod:`.tf_bundle` decodes the bundle, :mod:`.openai_tf` maps its tensors.
* **gpt2lab's own format** (:mod:`.native`): ``model.safetensors`` + ``config.json`` holding
  :class:`GPTConfig` with ``"format": "gpt2lab"``, so every variant (RoPE, GQA, windows) round-trips.

Readers return a config and a state dict in gpt2lab's names, checked against each other (all missing,
unexpected and mis-shaped tensors reported together in one line, never as a torch traceback); writers
take the same. :class:`gpt2lab.model.GPT` builds itself from them; nothing here imports the model.
"""

from __future__ import annotations

import os

import torch

from gpt2lab.checkpoints.hf import gpt_config_to_hf, hf_config_to_gpt, read_hf, write_hf
from gpt2lab.checkpoints.hf_variants import export_hf, hf_architecture
from gpt2lab.checkpoints.locate import locate
from gpt2lab.checkpoints.names import gpt_state_shapes
from gpt2lab.checkpoints.native import read_gpt2lab, write_gpt2lab
from gpt2lab.checkpoints.openai_tf import read_openai_tf
from gpt2lab.checkpoints.tensor_files import check_finite
from gpt2lab.checkpoints.tf_bundle import TFCheckpointReader, TFTensorEntry
from gpt2lab.config import GPTConfig

__all__ = [
    "TFCheckpointReader",
    "TFTensorEntry",
    "export_hf",
    "gpt_config_to_hf",
    "gpt_state_shapes",
    "hf_architecture",
    "hf_config_to_gpt",
    "read_checkpoint",
    "write_gpt2lab",
    "write_hf",
]


def read_checkpoint(name_or_path: str | os.PathLike) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """The config and state dict of a hub id, a hub-layout folder or file, an OpenAI TF checkpoint
    (folder, ``model.ckpt`` prefix or ``.index`` file) or a gpt2lab folder.

    The state is in gpt2lab's names and the dtype it was stored in, checked against the config, without the tied
    ``lm_head.weight`` (it is ``transformer.wte.weight``). Every failure is a one-line :class:`GPT2LabError`.
    """
    source = locate(str(name_or_path))
    if source.kind == "tf":
        config, state = read_openai_tf(source.config, source.weights[0])
    else:
        config, state = (read_gpt2lab if source.kind == "gpt2lab" else read_hf)(source.config, source.weights)
    check_finite(state, name_or_path)
    return config, state
