"""Faster ways to compute what the model computes, applied to a model from outside it: CPU kernels swapped in
for ``nn.Linear`` at load time (:mod:`.inference`, :mod:`.cpu_linear`, picked by :mod:`.choice`), int8 weights
(:mod:`.quantize`), the logit-free training loss (:mod:`.lm_head_loss`) and compiled decoding
(:mod:`.compiled_decoding`). Importing the package imports every module that offers kernel candidates, so
that :data:`gpt2lab.kernels.choice.KNOWN` names them all."""

from gpt2lab.kernels.compiled_decoding import CompiledDecoder
from gpt2lab.kernels.inference import apply_inference_kernels
from gpt2lab.kernels.quantize import quantize

__all__ = ["CompiledDecoder", "apply_inference_kernels", "quantize"]
