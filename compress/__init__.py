"""compress: make Hugging Face LLM checkpoints smaller and faster, from the shell or Python."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: `import compress` stays cheap (the CLI's --help does not import torch).
    from compress import api, loading as _load, recipe

    table = {
        "run": api.run,
        "evaluate": api.evaluate,
        "inspect_checkpoint": api.inspect_checkpoint,
        "load": _load.load,
        "load_recipe": recipe.load_recipe,
        "Recipe": recipe.Recipe,
    }
    if name in table:
        return table[name]
    raise AttributeError(f"module 'compress' has no attribute {name!r}")
