"""EleutherAI's lm-evaluation-harness on a gpt2lab model, with no export step.

:class:`GPT2LabLM` is an ``lm_eval`` model class: the harness hands it requests as text and it answers
with the three primitives every task is built from: the log-likelihood of a continuation given a
context, the rolling log-likelihood of a whole document (perplexity tasks), and greedy generation up
to stop strings. Tokenization is GPT-2's BPE (:mod:`gpt2lab.tokenizer`), as in the harness's own
``hf`` model for ``gpt2``, so the two score the same token sequences.

``lm_eval`` is an optional extra (``pip install 'gpt2lab[harness]'``) and is imported here only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from gpt2lab.errors import GPT2LabError, closest_hint
from gpt2lab.files import one_line, write_json
from gpt2lab.kernels.inference import apply_inference_kernels
from gpt2lab.loading import load_model
from gpt2lab.model import GPT
from gpt2lab.tokenizer import EOT_TOKEN, load_tokenizer

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as err:  # the optional extra is missing: `gpt2lab harness` prints this one line
    raise GPT2LabError(
        "the harness needs lm-evaluation-harness: pip install 'gpt2lab[harness]' (or pip install lm-eval)"
    ) from err


@register_model("gpt2lab")
class GPT2LabLM(TemplateLM):
    """A gpt2lab model as an lm_eval model: ``gpt2lab harness`` passes an instance; once this module is
    imported, ``simple_evaluate(model="gpt2lab", model_args="pretrained=PATH")`` finds it by name.

    ``pretrained`` is a :class:`GPT` or anything :func:`gpt2lab.loading.load_model` reads. Scores
    are computed in float32 whatever the weights' dtype; contexts longer than ``max_length`` (the
    model's block_size by default) keep their most recent tokens, as the harness's ``hf`` model does.
    """

    def __init__(
        self,
        pretrained: GPT | str = "gpt2",
        batch_size: int | str = 8,
        device: str = "cpu",
        dtype: str | None = None,
        max_length: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(pretrained, GPT):
            pretrained = apply_inference_kernels(load_model(pretrained, device=device), dtype)
        self.model = model = pretrained.eval()
        self.tok = load_tokenizer()
        if model.config.vocab_size < self.tok.n_vocab:
            raise GPT2LabError(
                f"the harness feeds GPT-2 BPE tokens (vocab {self.tok.n_vocab}); this model's vocab is "
                f"{model.config.vocab_size}"
            )
        if not str(batch_size).isdigit() or int(batch_size) < 1:  # lm_eval's CLI passes numbers as strings
            raise GPT2LabError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.batch_size = int(batch_size)
        self._max_length = int(max_length or model.config.block_size)
        model.config.check_length(self._max_length)

    @property
    def eot_token_id(self) -> int:
        return self.tok.eot_token

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def tokenizer_name(self) -> str:
        return "gpt2"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # <|endoftext|> in the text is the special token, as GPT-2's Hugging Face tokenizer reads it.
        return self.tok.encode(string, allowed_special={EOT_TOKEN})

    def tok_decode(self, tokens: Iterable[int]) -> str:
        return self.tok.decode([t for t in tokens if t != self.eot_token_id])

    # ------------------------------------------------------------------ scoring
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), whether greedy decoding gives the continuation)`` for each
        ``(key, context_ids, continuation_ids)``; ``key`` (the request's text pair) feeds lm_eval's cache."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        answers: list[tuple[float, bool] | None] = [None] * len(requests)
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for batch in tqdm(batches, desc="scoring", disable=disable_tqdm):
            scored = self._score_batch([requests[i][1] for i in batch], [requests[i][2] for i in batch])
            for i, answer in zip(batch, scored, strict=True):
                answers[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
        return answers

    @torch.no_grad()
    def _score_batch(self, contexts: Sequence[list[int]], continuations: Sequence[list[int]]):
        """One forward pass over right-padded rows (a causal model never looks at the padding after a
        row's end); each row's input is context + continuation without its last token."""
        rows = []
        for ctx, cont in zip(contexts, continuations, strict=True):
            if not cont or len(cont) > self.max_length:
                raise GPT2LabError(f"a continuation must have 1 to {self.max_length} tokens, got {len(cont)}")
            rows.append((ctx + cont)[-(self.max_length + 1) : -1])
        width = max(len(r) for r in rows)
        idx = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):
            idx[b, : len(row)] = torch.tensor(row)
        logits = self.model(idx.to(self.device))  # (B, T, vocab)
        answers = []
        for b, (row, cont) in enumerate(zip(rows, continuations, strict=True)):
            logprobs = F.log_softmax(logits[b, len(row) - len(cont) : len(row)].float(), dim=-1)  # (n, vocab)
            target = torch.tensor(cont, device=logprobs.device)
            total = logprobs.gather(1, target[:, None]).sum()
            answers.append((float(total), bool((logprobs.argmax(dim=-1) == target).all())))
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document's total log-likelihood, in windows of ``max_length`` that score every token once
        (the first conditioned on <|endoftext|>); the last window keeps a full context."""
        windows, owner = [], []
        for n, request in enumerate(requests):
            (text,) = request.args
            pairs = get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for ctx, cont in map(make_disjoint_window, pairs):
                windows.append((None, ctx, cont))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm), strict=True):
            totals[n] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations (sampled when a task asks for ``do_sample``), cut before the first stop
        string; requests with equal generation settings run as one ragged batch."""
        groups: dict[str, list[int]] = {}
        for n, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(n)
        answers: list[str | None] = [None] * len(requests)
        batches = [
            members[i : i + self.batch_size]
            for members in groups.values()
            for i in range(0, len(members), self.batch_size)
        ]
        for batch in tqdm(batches, desc="generating", disable=disable_tqdm):
            texts = self._generate_batch([requests[n].args[0] for n in batch], requests[batch[0]].args[1])
            for n, text in zip(batch, texts, strict=True):
                answers[n] = text
                self.cache_hook.add_partial("generate_until", requests[n].args, text)
        return answers

    def _generate_batch(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = min(int(kwargs.pop("max_gen_toks", 256)), self.max_length - 1)
        sampling = {"temperature": 0.0}
        if kwargs.pop("do_sample", False):
            sampling = {"temperature": float(kwargs.pop("temperature", 1.0)), "top_p": kwargs.pop("top_p", None)}
        keep = self.max_length - max_new  # the prompt's most recent tokens that leave room for the answer
        prompts = [(self.tok_encode(c) or [self.eot_token_id])[-keep:] for c in contexts]
        outputs = self.model.generate(prompts, max_new, stop=[*until, self.eot_token_id], **sampling)
        texts = []
        for prompt, out in zip(prompts, outputs, strict=True):
            text = self.tok_decode(out[len(prompt) :])
            for stop in until:
                text = text.split(stop, 1)[0]
            texts.append(text)
        return texts


# ---------------------------------------------------------------------------------------- the command


def _task_manager(tasks: list[str], include_path: Sequence[str] | None):
    """lm_eval's task index. Indexing its ~15,000 built-in tasks takes about a minute on 2 cores, so when
    every requested task is in ``include_path``, only those folders are indexed."""
    from lm_eval.tasks import TaskManager

    folders = list(include_path or [])
    for folder in folders:
        if not Path(folder).is_dir():
            raise GPT2LabError(f"--include-path {folder} is not a folder of task YAML files")
    if folders:
        local = TaskManager(include_path=folders, include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    return TaskManager(include_path=folders or None)


def _check_tasks(manager, tasks: list[str]) -> None:
    """Unknown names and unloadable data are one line each, before any model work starts."""
    known = set(manager.all_tasks)
    for name in tasks:
        if name not in known:
            raise GPT2LabError(f"unknown harness task '{name}'{closest_hint(name, known)}")
    try:
        manager.load(tasks)
    except Exception as err:  # datasets raises many kinds (connection, missing cache, bad files): all end here
        raise GPT2LabError(
            f"cannot load the data of {', '.join(tasks)}: {one_line(str(err) or type(err).__name__)} "
            "(offline, only tasks whose data is in the datasets cache or local, see --include-path, can run)"
        ) from err


def run_harness(
    model: GPT | str,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str | None = None,
    include_path: Sequence[str] | None = None,
    log_samples: bool = False,
    bootstrap_iters: int = 0,
) -> dict:
    """Run lm_eval's ``simple_evaluate`` with :class:`GPT2LabLM`; returns its results dictionary.

    ``bootstrap_iters`` > 0 adds standard errors (lm_eval's own default is 100,000 resamples, minutes of
    work on large tasks); 0 leaves them out."""
    from lm_eval import simple_evaluate

    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise GPT2LabError("no harness task named (for example --tasks lambada_openai,wikitext)")
    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its per-request INFO lines bury the progress bars
    manager = _task_manager(tasks, include_path)
    _check_tasks(manager, tasks)
    lm = GPT2LabLM(model, batch_size=batch_size, device=device, dtype=dtype)
    return simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=log_samples,
        bootstrap_iters=bootstrap_iters,
    )


def summary(results: dict) -> dict:
    """The JSON-ready part of a results dictionary: scores, task versions and shot counts (no samples)."""
    keep = ("results", "groups", "versions", "n-shot", "n-samples")
    return json.loads(json.dumps({k: results[k] for k in keep if k in results}, default=str))


def format_results(results: dict) -> str:
    from lm_eval.utils import make_table

    return make_table(results)


def write_results(results: dict, path: str | Path) -> None:
    """The :func:`summary` of ``results`` as JSON (atomically; the caller decides about an existing file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, summary(results))
