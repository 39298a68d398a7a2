"""The Python API under the CLI, one module per job: ``run`` (compress a recipe), ``evaluate``
(evaluate and compare), ``inspect`` (what a checkpoint holds), ``distill`` (train an existing
checkpoint against its original).

    import compress
    report = compress.run(compress.load_recipe("recipe.yaml", ["passes.0.gptq.bits=3"]))
    model = compress.load("out/smollm2-w4")
"""

from compress.api.run import *  # noqa: F401,F403
