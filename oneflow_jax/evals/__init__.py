"""Evaluation: shapes-world scores (`shapes_eval`), captioning any dataset (`captioning`) with COCO's caption metrics
(`caption_metrics`), and the FLOP-matched OneFlow vs AR+FM comparison (`compare`, `compare_report`)."""
