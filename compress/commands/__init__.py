"""The commands of `compress`, one module per group; cli.py assembles them into the app.

options: every shared option and option group; output: what gets printed; run: `run`;
methods: `quantize`, `prune`, `lowrank`; distill: `distill`; evaluate: `eval`, `compare`;
inspect: `inspect`, `demo-model`; serve: `generate`, `bench`.
"""
