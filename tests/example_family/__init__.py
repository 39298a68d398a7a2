"""A pass family added the way docs/architecture.md describes: this folder and one registry line.

``sign``: each weight row becomes α_r · sign(W_r), α_r = mean|W_r| (the scale that minimizes
‖W_r − α·sign(W_r)‖², as in XNOR-Net). The algorithm (``binarize.py``), the module type that
stores and serves it (``module.py``) and the pass adapter (``passes.py``) are all it takes: the
engine, the exporter and the loader run it without a line changed.
"""
