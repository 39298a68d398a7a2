"""The ``distill`` pass: the recipe's ``- distill: {...}`` after the compressing passes.

``scope: block`` runs inside the layer-wise sweep (the engine calls ``train_block`` for each block
once its compressing passes are done); ``scope: model`` runs on the whole exported student
against the teacher after the sweep (``compress.distill.run``). The pass targets no Linear itself.
"""

from __future__ import annotations

from compress.distill.config import DistillConfig

from compress.passes import Pass, register


@register
class DistillPass(Pass):
    name = "distill"
    Config = DistillConfig
    scope = "model"  # never planned on a Linear; scope: block is run by the engine through train_block
    distills = True

    def __init__(self, config, ctx=None):
        super().__init__(config, ctx)
        self.records: list[dict] = []  # scope block: one per block trained in this process

    def matches(self, full_name, module) -> bool:
        return False

    def train_block(self, block, teacher, hidden, kwargs, prefix: str, pruned: set[str], seed: int = 0) -> dict:
        from compress.distill.block import distill_block
        from compress.distill.trainable import commit, prepare

        prep = prepare(block, self.config.train, pruned)
        try:
            rec = distill_block(block, teacher, hidden, kwargs, self.config, prep, seed=seed, name=prefix.rstrip("."))
        finally:
            commit(block)
        rec = {"block": prefix.rstrip("."), **rec}
        self.records.append(rec)
        return rec
