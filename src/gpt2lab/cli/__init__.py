"""The ``gpt2lab`` command: the parser (``main``) and its subcommands, grouped by what they act on."""
