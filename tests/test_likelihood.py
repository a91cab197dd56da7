"""Text likelihood (evals/likelihood.py): the conditional chain's terms of the Edit Flow bound, and
`eval --task likelihood` on a OneFlow run (an ELBO estimate with its standard error, reproducible by seed)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

pytest.register_assert_rewrite("cli_utils")
from cli_utils import copy_workdir  # noqa: E402

from oneflow_jax.evals import likelihood  # noqa: E402

pytest_plugins = ("cli_utils",)


def test_conditional_chain_terms():
    doc = {"del_gap": np.array([0, 0, 2, 2]), "del_tokens": np.array([5, 5, 7, 8])}
    assert likelihood._bag_entropy_terms(doc) == pytest.approx(2 * math.log(2) - 4)   # n_(0,5) = 2, others 1
    assert likelihood._bag_entropy_terms({"del_gap": np.zeros(0, int), "del_tokens": np.zeros(0, int)}) == 0.0


def test_layout_names_where_the_images_are():
    assert likelihood.layout([5, 6, 7], 9) == "text only"
    assert likelihood.layout([9, 5, 6], 9) == "image first"
    assert likelihood.layout([5, 6, 9], 9) == "text first"
    assert likelihood.layout([5, 9, 6, 9], 9) == "interleaved"


def test_eval_likelihood_on_a_oneflow_run(cli, trained_run, tmp_path, monkeypatch):
    from oneflow_jax.evals import captioning
    from oneflow_jax.sampling import generate
    workdir = copy_workdir(trained_run.workdir, tmp_path / "run")
    result = cli.run("eval", f"--workdir={workdir}", "--task=likelihood", "--num_examples=4", "--elbo_samples=4")
    result.check()
    scores = json.loads((workdir / "eval" / "likelihood_step_12.json").read_text())
    assert scores["kind"].startswith("ELBO") and scores["documents"] == 4 and scores["samples_per_document"] == 4
    assert np.isfinite(scores["bits_per_token"]) and scores["bits_per_token"] > 0
    assert 0 < scores["stderr_bits_per_token"] < scores["bits_per_token"]
    assert "bits per text token" in result.stdout, str(result)
    # the bound's split over t and over document layouts adds up to it
    assert sum(scores["bits_per_token_by_time"].values()) == pytest.approx(scores["bits_per_token"])
    layouts = scores["by_layout"]
    assert sum(v["documents"] for v in layouts.values()) == 4 and set(layouts) <= {"image first", "text first",
                                                                                    "interleaved", "text only"}
    assert sum(v["bits_per_token"] * v["tokens"] for v in layouts.values()) == pytest.approx(
        scores["bits_per_token"] * scores["tokens"])

    monkeypatch.setenv("TFDS_DATA_DIR", str(cli.data_dir))
    run = generate.load_run(str(workdir))
    docs = [(run.tokenizer.encode(r["text"]), r["images"]) for r in captioning.split_records(run, "eval")[:2]]
    first, again = likelihood.evaluate(run, docs, 4, seed=1), likelihood.evaluate(run, docs, 4, seed=1)
    assert first == again                                                  # the seed fixes the times and x_t
    assert likelihood.evaluate(run, docs, 4, seed=2)["bits_per_token"] != first["bits_per_token"]

    text_only = likelihood.evaluate(run, [likelihood.without_images(t, run.tokenizer.image_id) for t, _ in docs], 4)
    assert set(text_only["by_layout"]) == {"text only"} and np.isfinite(text_only["bits_per_token"])
    assert text_only["tokens"] == first["tokens"]                          # the same text tokens, no images

    bad = cli.run("eval", f"--workdir={workdir}", "--task=likelihood", "--elbo_samples=1")
    assert bad.returncode == 2 and "--elbo_samples must be >= 2" in bad.stderr, str(bad)
