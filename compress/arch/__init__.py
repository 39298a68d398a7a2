"""Architecture knowledge: the table of model families (``families``: which norm feeds which
Linears, the Linear groups in forward order, the decoder-block list), the adaptations that make a
transformers module tree match the checkpoint on disk (``adapt``: Conv1D, fused MoE experts), and
scale folding at the family's points (``smoothing``)."""
