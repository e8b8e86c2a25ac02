"""What a request may ask for: the body of ``POST /v1/completions`` (OpenAI's names), the server's limits,
and errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, always one line that
names the field at fault."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator
from starlette.exceptions import HTTPException

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_LOGPROBS = 20
ATTENTION_MAX_TOKENS = 256  # the page's attention view: a T x T matrix goes back as JSON


@dataclass(frozen=True)
class Limits:
    """The server's bounds on one request and on the work it holds (``gpt2lab serve --help`` sets them)."""

    max_body_bytes: int = 1 << 20
    max_tokens: int = 512  # per completion
    max_prompt_tokens: int | None = None  # None: the model's context
    max_batch: int = 8  # rows decoding together
    max_queue: int = 64  # prompts waiting for a slot


class APIError(HTTPException):
    """An error answer: HTTP ``status`` and OpenAI's error object. An HTTPException, so that FastAPI passes it
    through unchanged when it is raised while the body is read (the body limit)."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        code: str | None = None,
    ) -> None:
        super().__init__(status, message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _must_be(expected: Any, note: str):
    def check(value):
        if value is not None and value != expected:
            raise ValueError(note)
        return value

    return check


class CompletionRequest(BaseModel):
    """The body of ``POST /v1/completions``. Fields OpenAI defines but gpt2lab cannot honour are accepted
    only at their neutral value (``n=1``, ``echo=false`` ...); any other field is refused by name."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr
    prompt: Any
    max_tokens: StrictInt = Field(16, ge=1)
    temperature: StrictFloat = Field(1.0, ge=0.0, le=2.0)
    top_p: StrictFloat = Field(1.0, gt=0.0, le=1.0)
    stop: StrictStr | list[StrictStr] | None = Field(None, validate_default=True)
    seed: StrictInt | None = None
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    stream: StrictBool = False
    # OpenAI fields accepted at their neutral value only
    n: StrictInt | None = None
    best_of: StrictInt | None = None
    echo: StrictBool | None = None
    presence_penalty: StrictFloat | None = None
    frequency_penalty: StrictFloat | None = None
    logit_bias: dict[str, Any] | None = None
    suffix: StrictStr | None = None
    user: StrictStr | None = None
    stream_options: dict[str, Any] | None = None

    _n = field_validator("n", "best_of")(_must_be(1, "only 1 completion per prompt is supported"))
    _echo = field_validator("echo")(_must_be(False, "echo is not supported"))
    _penalty = field_validator("presence_penalty", "frequency_penalty")(_must_be(0, "penalties are not supported"))
    _suffix = field_validator("suffix")(_must_be(None, "suffix is not supported"))

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value):
        if value:
            raise ValueError("logit_bias is not supported")
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt_texts(cls, value):
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("must be a string or a non-empty list of strings")
        if any(t == "" for t in texts):
            raise ValueError("must not be empty")
        return texts

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value):
        stops = [] if value is None else [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(s == "" for s in stops):
            raise ValueError("a stop string must not be empty")
        return stops


class AttentionRequest(BaseModel):
    """The body of ``POST /v1/attention`` (gpt2lab's own, for the page)."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr
    prompt: StrictStr = Field(min_length=1)
    layer: StrictInt = Field(0, ge=0)
    head: StrictInt = Field(0, ge=0)


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One line (and the field) from pydantic's errors: the first one, named by its path in the body."""
    err = errors[0]
    loc = [str(part) for part in err.get("loc", ()) if part != "body"]
    if err.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if err.get("type") == "model_attributes_type" or not loc:
        return "the request body must be a JSON object", None
    message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden":
        message = "unknown field"
    elif err.get("type") == "missing":
        message = "is required"
    return f"{'.'.join(loc)}: {message}", loc[0]
