"""compress: make Hugging Face LLM checkpoints smaller and faster, from the shell or Python."""

__version__ = "0.1.0"

# name -> (submodule, attribute), resolved on first use
_LAZY = {
    "run": ("api", "run"),
    "evaluate": ("api", "evaluate"),
    "inspect_checkpoint": ("api", "inspect_checkpoint"),
    "load": ("checkpoint.load", "load"),
    "load_recipe": ("recipe", "load_recipe"),
    "Recipe": ("recipe", "Recipe"),
}


def __getattr__(name):
    # Lazy: `import compress` stays cheap (the CLI's --help does not import torch). Only the
    # names above resolve here: `from compress import api` must reach the import system (a
    # submodule lookup that came back here would recurse forever).
    if name not in _LAZY:
        raise AttributeError(f"module 'compress' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    return getattr(importlib.import_module(f"compress.{module}"), attr)
