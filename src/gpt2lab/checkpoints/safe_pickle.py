"""Loading PyTorch pickles without ever running code from them.

``torch.load(..., weights_only=True)`` allows tensors and plain containers only: a file carrying any
other object is refused before any of it runs. Its error text, though, suggests retrying with
``weights_only=False``, which is exactly what must not be done with a file of unknown origin, and
it says the same of random bytes. This module turns both into one accurate line.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from gpt2lab.errors import GPT2LabError
from gpt2lab.files import one_line


def load_weights_only(source: Path | bytes, what: str) -> Any:
    """``torch.load`` of a file (or its bytes) with ``weights_only=True``; ``what`` names it in errors."""
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of files it then refuses
            warnings.simplefilter("ignore")
            return torch.load(stream, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if _is_pickle(source):
            raise GPT2LabError(
                f"refusing to load {what}: it holds objects other than tensors (a pickle can run code); "
                "use a file from a source you trust"
            ) from None
        raise GPT2LabError(f"{what} is not a readable PyTorch file (not a valid pickle)") from None
    except Exception as err:  # a damaged file trips the unpickler in many ways (IndexError, KeyError, EOFError...)
        raise GPT2LabError(
            f"{what} is not a readable PyTorch file: {one_line(f'{type(err).__name__}: {err}')}"
        ) from None


def _is_pickle(source: Path | bytes) -> bool:
    """Whether the (first) pickle of a torch file parses: read opcode by opcode, nothing executed."""
    data = io.BytesIO(source) if isinstance(source, bytes) else None
    try:
        with data or open(source, "rb") as f:
            if zipfile.is_zipfile(f):
                with zipfile.ZipFile(f) as archive:
                    name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
                    f = io.BytesIO(archive.read(name))
            f.seek(0)
            for _ in pickletools.genops(f):
                pass
        return True
    except Exception:  # any parse failure means: not a pickle
        return False
