"""The built-in families: one line each, imported by name on first use (so nothing here imports
a family, and no family is imported before a recipe or a checkpoint asks for one).

Importing a family's ``passes`` module registers its passes (``compress.passes.register``) and,
through the module types it imports, the types that store its results
(``compress.modules.register_module_type``). A new family adds its line here; a family in another
package registers through the ``compress.passes`` / ``compress.modules`` entry-point groups instead.
"""

from __future__ import annotations

import importlib

FAMILIES = (
    "compress.quant.passes",  # rtn, gptq, awq, smoothquant; QuantLinear, Int8Linear
    "compress.prune.passes",  # magnitude, wanda, sparsegpt
    "compress.prune.structured_pass",  # prune_structured
    "compress.quant.rotate_pass",  # rotate
    "compress.quant.codebook_pass",  # squeezellm; CodebookLinear
    "compress.lowrank.passes",  # lowrank; LowRankLinear
    "compress.distill.passes",  # distill
)


def load_families() -> None:
    for mod in FAMILIES:
        importlib.import_module(mod)
