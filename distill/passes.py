"""The ``distill`` pass: the recipe's ``- distill: {...}`` after the compressing passes.

``scope: block`` takes part in the sweep's train_block stage (each block's compressed modules
train against the original block once its compressing passes are done); ``scope: model`` takes
part in the transform_model stage (the whole exported student trains against the teacher after
the sweep, ``compress.distill.run``). The pass targets no Linear itself.
"""

from __future__ import annotations

import re

from compress.distill.block import distill_block
from compress.distill.config import DistillConfig
from compress.distill.loop import split_windows
from compress.distill.run import distill_checkpoint, distill_perplexities, write_trained
from compress.distill.trainable import commit, prepare

from compress.errors import UsageError
from compress.passes import Pass, register


@register
class DistillPass(Pass):
    name = "distill"
    Config = DistillConfig

    def in_stage(self, stage: str) -> bool:
        return stage == {"block": "train_block", "model": "transform_model"}[self.config.scope]

    def needs_calibration(self) -> bool:
        return True

    def validate(self, k, job):
        where = f"passes.{k}.{self.name}"
        at = [j for j, p in enumerate(job.passes) if isinstance(p, DistillPass)]
        if len(at) > 1 or k != len(job.passes) - 1:
            raise UsageError(f"passes.{at[0]}.{self.name}: distillation comes once, as the last pass, after the compressing passes")
        if k == 0:
            raise UsageError(f"{where}: distillation trains a compressed student; put a compressing pass before it "
                             "(e.g. `- gptq: {bits: 3, group_size: 64}` then `- distill: {}`), or distill an existing compressed "
                             "checkpoint with `compress distill STUDENT --teacher MODEL -o OUT`")
        if job.calibration is None:
            raise UsageError("calibration.samples: distillation trains on the calibration windows; set calibration.samples > 0")
        if self.config.scope == "model":
            split_windows(job.calibration, self.config.holdout, f"{where}.holdout")

    def check_sweep(self, sweep):
        if sweep.world.distributed:
            raise UsageError(f"{self.name} (scope: block) trains each block on all calibration windows in one process; "
                             "run it without torchrun / --nproc, or use scope: model after a distributed compression")

    # ---------------------------------------------------------------- scope: block

    def train_block(self, stage) -> None:
        masked = stage.masked  # a pruning pass's zeros stay zeros
        prep = prepare(stage.block, self.config.train, masked)
        name = stage.prefix.rstrip(".")
        try:
            rec = distill_block(stage.block, stage.teacher, stage.hidden, stage.kwargs, self.config, prep, seed=self.ctx.seed, name=name)
        finally:
            commit(stage.block)
        for rep in stage.layers:  # the block's output error (relative) before and after its training
            rep.passes.append(self.name)
            rep.info["block_distill"] = [rec["error_before"], rec["error_after"]]

    def summarize(self, layers: list[dict]) -> dict:
        """scope: block: each block's relative output error before and after its training."""
        if self.config.scope != "block":
            return {}
        blocks: dict[str, list[float]] = {}
        for r in layers:
            if "block_distill" in r.get("info", {}):
                m = re.match(r"(.*?\.\d+)\.", r["name"])
                blocks.setdefault(m.group(1) if m else r["name"], r["info"]["block_distill"])
        return {"distill": {"scope": "block", "train": self.config.train,
                            "blocks": {k: {"error_before": v[0], "error_after": v[1]} for k, v in blocks.items()}}}

    # ---------------------------------------------------------------- scope: model

    def transform_model(self, stage) -> dict:
        student, rec = distill_checkpoint(stage.checkpoint, stage.original, stage.calibration, self.config, seed=self.ctx.seed,
                                          work=stage.work, resume=stage.resume, hooks=stage.hooks)
        section = {"scope": "model", **rec}
        write_trained(stage.checkpoint, student, stage.output, section, overwrite=stage.overwrite)
        return {"distill": section}

    def report_eval(self, section: dict, after: dict, before: dict) -> None:
        section["distill"]["perplexity"] = distill_perplexities(after, before)
