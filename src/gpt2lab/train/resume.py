"""Resuming a run: the checkpoint continues the run it was written by, or the resume is refused.

A checkpoint is refused (one line naming the field) for another model, another tokenizer, or, unless
``--allow-changes``, other settings or other data (the data's token counts and SHA-256, recorded at
prepare). Settings that change how long a run goes, how often it reports or where it computes, and an
unset ``lr_decay_iters`` set to the value it stood for, pass. A run whose checkpoint is gone is refused
with the choices, or continued from its saved model with ``--from-saved-model``.
"""

from __future__ import annotations

from pathlib import Path

from gpt2lab.checkpoints.train_state import load_checkpoint
from gpt2lab.config import GPTConfig
from gpt2lab.data.fingerprint import tokenizer_digest
from gpt2lab.data.tokens import TokenData
from gpt2lab.errors import GPT2LabError, is_int
from gpt2lab.files import read_json
from gpt2lab.model import GPT
from gpt2lab.outputs import CKPT_NAME, CONFIG_FILE, METRICS_NAME, TOKENIZER_FILE, TRAIN_CONFIG_FILE, WEIGHTS_FILE
from gpt2lab.train.config import TrainConfig, upgrade_train_fields
from gpt2lab.train.run import holds_run, read_metrics

# What may differ between a run and its resumption: how long it runs, how often it reports, and where
# and how it computes. Anything else (data, model, batch, schedule, seed, precision) changes the result.
RESUMABLE_CHANGES = (
    "max_iters", "eval_interval", "eval_iters", "log_interval", "ckpt_interval",
    "out_dir", "device", "compile", "strategy", "skip_nonfinite", "hellaswag_interval", "hellaswag_file",
    "reference", "log_to", "process_group", "vocab_multiple",
)  # fmt: skip
# Model fields that change what training computes but not the weights' shapes: --allow-changes may change them.
MODEL_TRAINING_FIELDS = ("dropout",)


def read_resume_state(cfg: TrainConfig, from_saved_model: bool = False) -> dict | None:
    """What ``--resume`` continues from, read before the model is built (the model takes the checkpoint's
    ``model_config``, its padded vocabulary included): the run's checkpoint; with ``from_saved_model`` its
    exported model when the checkpoint is gone (optimizer state starts afresh); None for a run killed before
    its first checkpoint. :func:`resume_checkpoint` then checks it against the model and the config."""
    run_dir = Path(cfg.out_dir)
    ckpt_path = run_dir / CKPT_NAME
    if not ckpt_path.is_file():
        return _resume_without_checkpoint(cfg, from_saved_model)
    if from_saved_model:
        raise GPT2LabError(f"--from-saved-model is for a run whose {CKPT_NAME} is gone; {ckpt_path} exists: drop it")
    state = load_checkpoint(ckpt_path)
    _check_not_past_end(run_dir, state["step"], cfg.max_iters)
    return state


def resume_checkpoint(
    cfg: TrainConfig, data: TokenData, config: GPTConfig, allow_changes: bool, state: dict | None
) -> dict | None:
    """``state`` (from :func:`read_resume_state`), refused when it holds another model, or was trained on other
    data or settings than the config describes (unless ``allow_changes``); None when there is none."""
    if state is None:
        return None
    run_dir = Path(cfg.out_dir)
    _check_same_model(run_dir, state["model_config"], config.to_dict())
    if state.get("from_saved_model"):
        return state
    _check_same_tokenizer(run_dir, data)
    saved_cfg = upgrade_train_fields(state.get("train_config", {}), str(run_dir / CKPT_NAME))
    changes = _train_changes(saved_cfg, cfg.to_dict())
    changes += [
        f"{k} {state['model_config'].get(k)!r} -> {config.to_dict().get(k)!r}"
        for k in MODEL_TRAINING_FIELDS
        if state["model_config"].get(k) != config.to_dict().get(k)
    ]
    changes += _data_changes(state.get("data"), data)
    if changes and not allow_changes:
        raise GPT2LabError(
            f"--resume would not continue the run in {run_dir} as it was: {'; '.join(changes)}; "
            "undo the change, or pass --allow-changes to resume with it anyway"
        )
    return state


def _check_not_past_end(run_dir: Path, step: int, max_iters: int) -> None:
    if step > max_iters:
        raise GPT2LabError(
            f"the run in {run_dir} is at step {step}, past max_iters {max_iters}: nothing would be trained; "
            f"set max_iters above {step} to continue it"
        )


def _resume_without_checkpoint(cfg: TrainConfig, from_saved_model: bool) -> dict | None:
    """No ``ckpt.pt``: a run killed before its first checkpoint starts from step 0 (it had nothing to lose);
    a run that trained and saved (a model, or logged steps a checkpoint followed) is refused with the choices."""
    run_dir = Path(cfg.out_dir)
    if not holds_run(run_dir):
        raise GPT2LabError(f"nothing to resume: {run_dir / CKPT_NAME} does not exist")
    saved = (run_dir / WEIGHTS_FILE).is_file() and (run_dir / CONFIG_FILE).is_file()
    if from_saved_model:
        if not saved:
            raise GPT2LabError(f"--from-saved-model: {run_dir} has no saved model (config.json + model.safetensors)")
        return _state_from_saved_model(run_dir, cfg)
    config_file = run_dir / TRAIN_CONFIG_FILE
    interval = read_json(config_file).get("ckpt_interval") if config_file.is_file() else None
    step = _last_logged_step(run_dir)
    checkpointed = is_int(interval) and step > interval  # steps past a checkpoint were logged: it was removed
    if saved or checkpointed:
        raise GPT2LabError(
            f"{run_dir} holds a trained run but its {CKPT_NAME} is gone, so it cannot resume exactly: start it "
            "again with --overwrite, or continue from its saved model with --resume --from-saved-model"
        )
    return None


def _state_from_saved_model(run_dir: Path, cfg: TrainConfig) -> dict:
    """A resume state from the run's exported model at the last step its metrics logged, with a fresh
    optimizer and the run's seed: the run continues, though not as an uninterrupted one would. The export
    has no padded vocabulary, so neither has the continued run."""
    model = GPT.from_pretrained(run_dir)
    step = _last_logged_step(run_dir)
    _check_not_past_end(run_dir, step, cfg.max_iters)
    state = {"model": model.state_dict(), "optimizer": {}, "step": step}
    return state | {"model_config": model.config.to_dict(), "from_saved_model": True}


def _last_logged_step(run_dir: Path) -> int:
    if not (run_dir / METRICS_NAME).is_file():
        return 0
    return max((row.get("step", 0) for row in read_metrics(run_dir)), default=0)


def _check_same_model(run_dir: Path, saved: dict, now: dict) -> None:
    diff = [
        f"{k}: {saved.get(k)!r} vs {now.get(k)!r}"
        for k in now
        if k not in MODEL_TRAINING_FIELDS and saved.get(k) != now.get(k)
    ]
    if diff:
        raise GPT2LabError(f"{run_dir} holds a run of a different model ({'; '.join(diff)} in checkpoint vs config)")


def _check_same_tokenizer(run_dir: Path, data: TokenData) -> None:
    """A model reads its tokens through the tokenizer it was trained with: another one (the same size, other
    characters) would make it decode the wrong text. Never resumable, not even with --allow-changes."""
    if (run_dir / TOKENIZER_FILE).is_file() and tokenizer_digest(run_dir) != tokenizer_digest(data.path):
        raise GPT2LabError(
            f"the tokenizer of {data.path} is not the one the run in {run_dir} was trained with "
            f"({TOKENIZER_FILE} differs): the model would read other tokens; use the run's data"
        )


def _effective(train_cfg: dict, key: str):
    """A setting as the run uses it: an unset ``lr_decay_iters`` decays over ``max_iters``."""
    if key == "lr_decay_iters" and train_cfg.get(key) is None:
        return train_cfg.get("max_iters")
    return train_cfg.get(key)


def _train_changes(saved_cfg: dict, now_cfg: dict) -> list[str]:
    return [
        f"{k} {saved_cfg[k]!r} -> {now_cfg[k]!r}"
        for k in now_cfg
        if k in saved_cfg
        and k not in RESUMABLE_CHANGES
        and saved_cfg[k] != now_cfg[k]
        and _effective(saved_cfg, k) != _effective(now_cfg, k)
    ]


def _data_changes(saved: dict | None, data: TokenData) -> list[str]:
    """The data differs when any field the checkpoint recorded differs (older checkpoints recorded counts
    only, and are compared on those)."""
    if not saved:
        return []
    now = data.fingerprint
    differ = [k for k in saved if k in now and saved[k] != now[k]]
    if not differ:
        return []
    what = "content" if differ == ["content_sha256"] else ", ".join(differ)
    return [f"the data in {data.path} ({what} changed since the checkpoint)"]


def data_fingerprint(data: TokenData) -> dict:
    """What identifies a prepared dataset's content: tokenizer, token counts, SHA-256 of tokens and tokenizer."""
    return dict(data.fingerprint)
