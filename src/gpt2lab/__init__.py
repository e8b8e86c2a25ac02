"""gpt2lab: GPT-2 from scratch in PyTorch, with RoPE, grouped-query and sliding-window variants."""

from gpt2lab.config import PRESETS, GPTConfig
from gpt2lab.errors import GPT2LabError
from gpt2lab.kernels import apply_inference_kernels, quantize
from gpt2lab.model import GPT
from gpt2lab.tokenizer import load_tokenizer

__all__ = ["GPT", "GPTConfig", "GPT2LabError", "PRESETS", "apply_inference_kernels", "load_tokenizer", "quantize"]
__version__ = "0.1.0"
