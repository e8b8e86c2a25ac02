"""``gpt2lab serve``: OpenAI-compatible completions over HTTP with continuous batching, and a page to try a
model (streamed text, next-token probabilities, attention patterns). Needs the ``serve`` extra (FastAPI,
uvicorn). Modules: app (routes), schema (request body, limits, errors), completions (one request's answer),
batching (the scheduler), batch_cache (the KV cache of a changing batch), attention_view (the page's pattern).
"""
