"""Evaluation: shapes-world scores (`shapes_eval`) and the FLOP-matched OneFlow vs AR+FM comparison (`compare`)."""
