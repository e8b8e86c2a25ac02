"""``gpt2lab serve``: the OpenAI-compatible completions server and its page (:mod:`gpt2lab.serve`).

Safe by default: it binds 127.0.0.1; any other address needs an API key (``--api-key`` or the
``GPT2LAB_API_KEY`` environment variable). Models are named and loaded here, at start, never from a path
in a request. FastAPI and uvicorn are an optional extra: without them the command says which to install.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import threading

from gpt2lab.cli import arguments as arg
from gpt2lab.errors import GPT2LabError

API_KEY_ENV = "GPT2LAB_API_KEY"
INSTALL_HINT = "gpt2lab serve needs FastAPI and uvicorn: pip install 'gpt2lab[serve]'"


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve models over OpenAI's completions API, with a page to try them")
    p.add_argument("model", nargs="?", default=None, help="one model (hub id, folder, checkpoint); served by this name")
    p.add_argument(
        "--model",
        dest="models",
        action="append",
        default=None,
        metavar="NAME=PATH",
        help="a model served as NAME (repeatable)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=arg.nonnegative_int("port"), default=8000)
    p.add_argument("--api-key", default=None, help=f"require this Bearer key (default: ${API_KEY_ENV})")
    p.add_argument("--max-batch", type=arg.positive_int("max_batch"), default=8, help="rows decoding together")
    p.add_argument("--max-queue", type=arg.positive_int("max_queue"), default=64, help="prompts waiting (then 429)")
    p.add_argument("--max-tokens", type=arg.positive_int("max_tokens"), default=512, help="per completion")
    p.add_argument(
        "--max-prompt-tokens",
        type=arg.positive_int("max_prompt_tokens"),
        default=None,
        help="default: the model's context",
    )
    p.add_argument("--max-body-bytes", type=arg.positive_int("max_body_bytes"), default=1 << 20)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "int8"), default="float32")
    p.add_argument("--device", type=arg.device, default="cpu")
    p.add_argument("--threads", type=arg.positive_int("threads"), default=None, help="torch CPU threads")
    p.set_defaults(func=cmd_serve)


def model_specs(positional: str | None, named: list[str] | None) -> dict[str, str]:
    """Served name -> path, from ``MODEL`` and/or repeated ``--model NAME=PATH``."""
    specs: dict[str, str] = {}
    if positional is not None:
        specs[positional] = positional
    for item in named or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise GPT2LabError(f"--model wants NAME=PATH, got {item!r}")
        if name in specs:
            raise GPT2LabError(f"--model: the name {name!r} is given twice")
        specs[name] = path
    if not specs:
        raise GPT2LabError("serve needs a model: gpt2lab serve PATH, or --model NAME=PATH (repeatable)")
    return specs


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_api_key(host: str, given: str | None) -> str | None:
    key = given if given is not None else os.environ.get(API_KEY_ENV) or None
    if key is not None and len(key) < 8:
        raise GPT2LabError("--api-key must be at least 8 characters")
    if key is None and not is_loopback(host):
        raise GPT2LabError(f"binding {host} (not loopback) needs --api-key or ${API_KEY_ENV}")
    return key


def cmd_serve(args) -> int:
    specs = model_specs(args.model, args.models)
    api_key = resolve_api_key(args.host, args.api_key)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise GPT2LabError(INSTALL_HINT) from None
    import torch

    from gpt2lab.serve.app import build_app, load_models, stop_all
    from gpt2lab.serve.schema import Limits

    if args.threads:
        torch.set_num_threads(args.threads)
    limits = Limits(args.max_body_bytes, args.max_tokens, args.max_prompt_tokens, args.max_batch, args.max_queue)
    served = load_models(specs, limits, args.dtype, args.device)
    try:
        app = build_app(served, limits, api_key)
        print(
            f"serving {', '.join(served)} at http://{args.host}:{args.port}/ (max batch {args.max_batch})", flush=True
        )
        # uvicorn turns SIGTERM/SIGINT into a graceful stop (no new connections, in-flight requests finish),
        # then raises the signal again for the handler it found. After SIGTERM that stop is the whole job:
        # the handler set here lets the command end normally, with status 0.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda signum, frame: None)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=None)
    finally:
        stop_all(served)
    return 0
