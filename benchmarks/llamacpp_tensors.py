"""llama.cpp's intermediate tensors, read through its graph callback (``cb_eval``), for benchmarks/llamacpp.py.

llama.cpp names the tensors of its graph ("ffn_up_b-0": layer 0's MLP input to the activation, "ffn_gelu-0":
its output). ``capture`` evaluates a prompt with a callback that asks for the named tensors and copies each
as ggml computed it, from libggml's own accessors (``ggml_get_name``, ``ggml_nelements``,
``ggml_get_data_f32``), so no struct layout is assumed.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np


def _ggml_base():
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_get_name.restype, lib.ggml_get_name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    lib.ggml_nelements.restype, lib.ggml_nelements.argtypes = ctypes.c_int64, [ctypes.c_void_p]
    lib.ggml_get_data_f32.restype = ctypes.POINTER(ctypes.c_float)
    lib.ggml_get_data_f32.argtypes = [ctypes.c_void_p]
    return lib


def capture(path: Path, ids: list[int], names: set[str], threads: int) -> dict[str, np.ndarray]:
    """The f32 tensors called ``names`` while llama.cpp (f32 KV cache) evaluates ``ids`` with the model at ``path``."""
    import llama_cpp
    from llama_cpp import llama as llama_module

    lib, found = _ggml_base(), {}

    @llama_cpp.ggml_backend_sched_eval_callback
    def callback(tensor, ask, _user_data):
        name = lib.ggml_get_name(tensor).decode()
        if ask:
            return name in names
        found[name] = np.ctypeslib.as_array(lib.ggml_get_data_f32(tensor), (lib.ggml_nelements(tensor),)).copy()
        return True

    defaults = llama_module.llama_cpp.llama_context_default_params

    def with_callback():
        params = defaults()
        params.cb_eval = callback
        return params

    llama_module.llama_cpp.llama_context_default_params = with_callback  # Llama() takes its defaults from here
    try:
        llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=256, n_threads=threads, n_threads_batch=threads, verbose=False,
            type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
        )  # fmt: skip
        llm.eval(ids)
    finally:
        llama_module.llama_cpp.llama_context_default_params = defaults
    missing = names - found.keys()
    if missing:
        raise RuntimeError(f"llama.cpp's graph has no tensor named {', '.join(sorted(missing))}")
    return found
