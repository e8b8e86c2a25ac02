"""gpt2lab's tensor names and shapes, how each checkpoint format names and lays them out, and the check.

:func:`gpt_state_shapes` derives every name and shape from a :class:`GPTConfig`; a layout maps them to
one format's names and shapes (gpt2lab itself, transformers' Conv1D, OpenAI's TF variables), and
:func:`collect_state` reports in one line every missing, unexpected and mis-shaped tensor before any
is loaded.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch

from gpt2lab.config import GPTConfig
from gpt2lab.errors import GPT2LabError
from gpt2lab.outputs import CONFIG_FILE, WEIGHTS_FILE

__all__ = [
    "CONFIG_FILE", "GPT2LAB_LAYOUT", "HF_LAYOUT", "TF_LAYOUT", "WEIGHTS_FILE", "Layout", "collect_state",
    "gpt_state_shapes",
]  # fmt: skip

# The file names of a saved model folder (gpt2lab's format and the hub layout alike), named once here.


def gpt_state_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor a :class:`GPT` of ``config`` loads, without the tied ``lm_head``.

    Computed from the config (not by building a model) so a checkpoint is checked before any memory
    is spent on it; a test holds this equal to ``GPT(config).state_dict()`` for every variant.
    """
    C, kv = config.n_embd, config.n_kv_head * config.head_dim
    shapes = {"transformer.wte.weight": (config.vocab_rows, C)}  # padded rows included
    if config.pos_encoding == "learned":
        shapes["transformer.wpe.weight"] = (config.block_size, C)
    for i in range(config.n_layer):
        h = f"transformer.h.{i}"
        shapes |= {
            f"{h}.ln_1.weight": (C,),
            f"{h}.ln_1.bias": (C,),
            f"{h}.attn.c_attn.weight": (C + 2 * kv, C),  # rows: q | k | v
            f"{h}.attn.c_attn.bias": (C + 2 * kv,),
            f"{h}.attn.c_proj.weight": (C, C),
            f"{h}.attn.c_proj.bias": (C,),
            f"{h}.ln_2.weight": (C,),
            f"{h}.ln_2.bias": (C,),
            f"{h}.mlp.c_fc.weight": (4 * C, C),
            f"{h}.mlp.c_fc.bias": (4 * C,),
            f"{h}.mlp.c_proj.weight": (C, 4 * C),
            f"{h}.mlp.c_proj.bias": (C,),
        }
    shapes |= {"transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,)}
    return shapes


def _is_projection_weight(name: str) -> bool:
    """GPT-2's Conv1D layers: stored (in, out) by OpenAI and transformers, (out, in) by nn.Linear."""
    return name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))


class Layout:
    """How one format names and lays out each gpt2lab tensor. The identity: gpt2lab's own format."""

    def name(self, gpt_name: str) -> str:
        return gpt_name

    def shape(self, gpt_name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape

    def to_gpt(self, gpt_name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


class HFLayout(Layout):
    """transformers' GPT2Model names (``h.0.attn.c_attn.weight``) with Conv1D weights as (in, out)."""

    def name(self, gpt_name: str) -> str:
        return gpt_name.removeprefix("transformer.")

    def shape(self, gpt_name, shape):
        return shape[::-1] if _is_projection_weight(gpt_name) else shape

    def to_gpt(self, gpt_name, tensor):
        return tensor.t() if _is_projection_weight(gpt_name) else tensor

    def from_gpt(self, gpt_name: str, tensor: torch.Tensor) -> torch.Tensor:
        return self.to_gpt(gpt_name, tensor)  # a transpose is its own inverse


class TFLayout(Layout):
    """OpenAI's names (``model/h0/attn/c_attn/w``): LayerNorm g/b, Conv1D w as [1, in, out], b."""

    def name(self, gpt_name):
        parts = gpt_name.removeprefix("transformer.").split(".")
        if parts[0] in ("wte", "wpe"):
            return f"model/{parts[0]}"
        if parts[0] == "h":
            parts = [f"h{parts[1]}", *parts[2:]]
        module, leaf = parts[-2], parts[-1]
        parts[-1] = "b" if leaf == "bias" else "g" if module.startswith("ln_") else "w"
        return "model/" + "/".join(parts)

    def shape(self, gpt_name, shape):
        return (1, *shape[::-1]) if _is_projection_weight(gpt_name) else shape

    def to_gpt(self, gpt_name, tensor):
        return tensor[0].t() if _is_projection_weight(gpt_name) else tensor


GPT2LAB_LAYOUT, HF_LAYOUT, TF_LAYOUT = Layout(), HFLayout(), TFLayout()


def collect_state(
    config: GPTConfig,
    found: Mapping[str, tuple[int, ...]],
    load: Callable[[str], torch.Tensor],
    layout: Layout,
    what: str,
) -> dict[str, torch.Tensor]:
    """gpt2lab's state dict from a checkpoint whose tensors (name → shape in ``found``) follow ``layout``.

    Names and shapes are checked before anything is loaded, so a wrong checkpoint costs no reading.
    """
    wanted = {gpt: (layout.name(gpt), layout.shape(gpt, shape)) for gpt, shape in gpt_state_shapes(config).items()}
    _check_tensors(found, dict(wanted.values()), what)
    return {gpt: layout.to_gpt(gpt, load(name)) for gpt, (name, _) in wanted.items()}


def _check_tensors(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], what: str) -> None:
    """One error naming every missing, unexpected and mis-shaped tensor (grouped over layers)."""
    missing = [n for n in expected if n not in found]
    unexpected = sorted((n for n in found if n not in expected), key=_natural_key)
    misshaped = [(n, tuple(found[n]), expected[n]) for n in expected if n in found and tuple(found[n]) != expected[n]]
    if not (missing or unexpected or misshaped):
        return
    problems = []
    if missing:
        problems.append(f"missing {_compact(missing)}")
    if unexpected:
        problems.append(f"unexpected {_compact(unexpected)}")
    by_shapes: dict[tuple, list[str]] = {}
    for name, got, want in misshaped:
        by_shapes.setdefault((got, want), []).append(name)
    for (got, want), names in by_shapes.items():
        problems.append(f"shape of {_compact(names)} is {got}, expected {want}")
    raise GPT2LabError(f"{what} does not match the config: {'; '.join(problems)}")


_LAYER_NUMBER = re.compile(r"^(.*?h[./]?)(\d+)([./].*)$")


def _natural_key(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def _compact(names: list[str]) -> str:
    """``h.[0-2,5].ln_1.weight, wte.weight``: names that differ only by layer number share one entry."""
    groups: dict[tuple[str, str], list[int]] = {}
    for name in names:
        m = _LAYER_NUMBER.match(name)
        key = (m.group(1), m.group(3)) if m else (name, "")
        groups.setdefault(key, []).append(int(m.group(2)) if m else -1)
    parts = []
    for (head, tail), layers in groups.items():
        if layers == [-1]:
            parts.append(head)
        elif len(layers) == 1:
            parts.append(f"{head}{layers[0]}{tail}")
        else:
            parts.append(f"{head}[{_ranges(sorted(layers))}]{tail}")
    return ", ".join(parts)


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
