"""Execution options: how the model runs on a machine, never what it computes."""

REMAT_POLICIES = ("none", "full", "dots")
LAYER_LOOPS = ("auto", "scan", "unroll")
WEIGHT_FORMATS = ("auto", "out_in", "in_out", "out_in_reduce")
