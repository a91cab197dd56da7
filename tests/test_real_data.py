"""The real-data walk-through as a user runs it (launch/real_data_example.sh, docs/real_data.md): photographs that
scikit-image ships -> webdataset + parquet shards -> latents of a tiny SD3-architecture VAE precomputed by 2
processes -> 20 training steps with a byte-level BPE tokenizer.json -> a caption and an image sampled -> a PyTorch
export that passes its parity check."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

pytest.register_assert_rewrite("cli_utils")
from cli_utils import REPO, metrics_by_step  # noqa: E402

pytest_plugins = ("cli_utils",)
pytest.importorskip("skimage")
pytest.importorskip("torch")


def test_photos_from_shards_to_a_pytorch_checkpoint(cli, tmp_path):
    out = tmp_path / "example"
    result = cli._start(["bash", str(REPO / "launch" / "real_data_example.sh"), str(out)], cli.env(1)).wait(600)
    assert result.returncode == 0, str(result)

    info = json.loads((out / "data" / "image_caption_pairs" / "photos_example" / "1.0.0" /
                       "metadata.json").read_text())["precompute"]
    assert info["images"] == 56 and info["latent_dtype"] == "bfloat16" and sum(info["skipped"].values()) == 0
    assert result.stdout.count("100.0% of encoder FLOPs on real images") == 2, str(result)   # both processes

    rows = metrics_by_step(out / "run")
    assert sorted(rows) == [5, 10, 15, 20] and all(np.isfinite(r["loss"]) for r in rows.values())
    assert (out / "run" / "tokenizer.hf.json").exists()

    caption = (out / "samples" / "caption" / "0000_00.txt").read_text()
    assert caption.strip(), "no caption sampled"
    image = Image.open(out / "samples" / "image" / "0000_00_img0.png")
    assert image.size == (32, 32)

    assert "parity ok" in result.stdout, str(result)
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in (out / "torch").iterdir()}
