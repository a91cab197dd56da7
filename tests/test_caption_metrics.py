"""Caption metrics (evals/caption_metrics.py) against pycocoevalcap used directly, the Java-free tokenizer against
COCO's PTB tokenizer, reference files, and `eval --task caption` on a trained run's split and on a references file."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

pytest.register_assert_rewrite("cli_utils")
from cli_utils import assert_one_line_error, copy_workdir  # noqa: E402

from oneflow_jax.cli import UserError  # noqa: E402
from oneflow_jax.data import shapes_world as sw  # noqa: E402
from oneflow_jax.evals import caption_metrics as cm  # noqa: E402

pytest_plugins = ("cli_utils",)
pytest.importorskip("pycocoevalcap")
needs_java = pytest.mark.skipif(not cm.java_available(), reason="COCO's PTB tokenizer and METEOR need java")

CAPTIONS = ["Hello, world... don't (stop)!", 'A man\'s "red" hat -- on a [table]; really?',
            "Two dogs: they're playing.", "It's 3:30 p.m. in the U.S.", "a cat's toy, isn't it",
            "1,000 people at the U.N. headquarters.", "A dog (brown) jumps over 2.5 fences!",
            "She said \"hi\" and left...", "The girl's bike; the boys' bikes."]
REFERENCES = {1: ["A red circle on the left, a blue square.", "a red circle and a blue square"],
              2: ["Two cats on a sofa.", "two cats sleeping on a couch"], 3: ["A man riding a horse on a beach."]}
CANDIDATES = {1: ["a red circle on the left and a blue square"], 2: ["a cat on a sofa"],
              3: ["a person riding a horse at the beach"]}


@needs_java
def test_python_tokenizer_matches_ptb():
    captions = {i: [c] for i, c in enumerate(CAPTIONS)}
    assert cm.tokenize(captions, use_java=True)[0] == cm.tokenize(captions, use_java=False)[0]


@needs_java
def test_scores_equal_pycocoevalcap_used_directly():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in REFERENCES.items()})
    res = tok.tokenize({k: [{"caption": c} for c in v] for k, v in CANDIDATES.items()})
    direct = dict(zip(["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"], Bleu(4).compute_score(gts, res, verbose=0)[0]))
    direct.update({"ROUGE-L": Rouge().compute_score(gts, res)[0], "CIDEr": Cider().compute_score(gts, res)[0],
                   "METEOR": Meteor().compute_score(gts, res)[0]})
    ours = cm.score(CANDIDATES, REFERENCES)
    assert ours["tokenizer"] == "ptb" and ours["n"] == 3 and set(ours["unavailable"]) == {"SPICE"}
    for name, value in direct.items():
        assert abs(ours[name] - value) < 1e-6, (name, ours[name], value)


def test_perfect_and_disjoint_captions_without_java():
    same = cm.score({k: [v[0]] for k, v in REFERENCES.items()}, REFERENCES, use_java=False)
    assert same["tokenizer"] == "python" and "METEOR" in same["unavailable"] and "METEOR" not in same
    assert same["BLEU-4"] == pytest.approx(1.0, abs=1e-6) and same["ROUGE-L"] == pytest.approx(1.0)
    disjoint = cm.score({k: ["zebra xylophone quartz"] for k in REFERENCES}, REFERENCES, use_java=False)
    assert disjoint["BLEU-1"] < 1e-6 and disjoint["ROUGE-L"] == 0.0 and disjoint["CIDEr"] == 0.0
    assert cm.score(CANDIDATES, REFERENCES, use_java=False)["CIDEr"] < same["CIDEr"]


def test_reference_files(tmp_path):
    jsonl = tmp_path / "refs.jsonl"
    jsonl.write_text('{"image": "a.png", "captions": ["x y", "y z"]}\n\n{"image": "b.png", "caption": "w"}\n')
    assert cm.load_references(str(jsonl)) == {"a.png": ["x y", "y z"], "b.png": ["w"]}
    coco = tmp_path / "captions_val.json"
    coco.write_text(json.dumps({"images": [{"id": 7, "file_name": "c.jpg"}],
                                "annotations": [{"image_id": 7, "caption": "one"}, {"image_id": 7, "caption": "two"}]}))
    assert cm.load_references(str(coco)) == {"c.jpg": ["one", "two"]}
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png"}\n')
    with pytest.raises(UserError, match="bad.jsonl line 1"):
        cm.load_references(str(tmp_path / "bad.jsonl"))
    with pytest.raises(UserError, match="no reference caption"):
        cm.score({"nope": ["a"]}, {"a.png": ["b"]}, use_java=False)


def test_eval_caption_task_on_the_split_and_on_a_references_file(cli, trained_run, tmp_path, monkeypatch):
    from oneflow_jax.evals import captioning
    from oneflow_jax.sampling import generate
    workdir = copy_workdir(trained_run.workdir, tmp_path / "run")
    monkeypatch.setenv("TFDS_DATA_DIR", str(cli.data_dir))
    items = captioning.dataset_items(generate.load_run(str(workdir)), "eval", 6)     # the default: the run's split
    assert len(items) == 6 and all(sw.parse_caption(refs[0]) for _, _, refs in items)
    assert all(image.shape == (32, 32, 3) and image.dtype == np.uint8 for _, image, _ in items)

    lines = []
    for i in range(3):
        doc = sw.generate_document("eval", i)
        Image.fromarray(np.asarray(doc.images[0])).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "captions": [sw.caption(doc.specs[0]), "two shapes"]}))
    (tmp_path / "refs.jsonl").write_text("\n".join(lines) + "\n")
    result = cli.run("eval", f"--workdir={workdir}", "--task=caption", f"--references={tmp_path / 'refs.jsonl'}")
    result.check()
    scores = json.loads((workdir / "eval" / "caption_step_12.json").read_text())
    rows = [json.loads(line) for line in (workdir / "eval" / "caption_step_12.jsonl").read_text().splitlines()]
    assert scores["n"] == len(rows) == 3 and scores["references"].endswith("refs.jsonl")
    assert "CIDEr" in scores and scores["cost"]["nfe_per_batch"] > 0 and rows[0]["references"][1] == "two shapes"
    assert "captioning, step 12: 3 images" in result.stdout, str(result)

    (tmp_path / "refs.jsonl").write_text('{"image": "missing.png", "captions": ["a"]}\n')
    bad = cli.run("eval", f"--workdir={workdir}", "--task=caption", f"--references={tmp_path / 'refs.jsonl'}")
    assert_one_line_error(bad, "missing.png")


def test_the_comparison_scores_a_non_shapes_dataset_with_caption_metrics(trained_run, cli, monkeypatch):
    import ml_collections
    from oneflow_jax import config_lib
    from oneflow_jax.evals import compare
    from oneflow_jax.sampling import generate
    config = ml_collections.ConfigDict({"compare": {"metric_set": "auto"}, "data": {"name": "shapes_world"}})
    assert compare.metric_set_name(config) == "shapes_world"
    config.data.name = "image_caption_pairs"
    assert compare.metric_set_name(config) == "caption"
    monkeypatch.setenv("TFDS_DATA_DIR", str(cli.data_dir))
    run = generate.load_run(str(trained_run.workdir))
    c = ml_collections.ConfigDict(dict(eval_examples=3, eval_batch_size=3, latency_prompts=1))
    scores = compare.CaptionMetrics.evaluate(run, c, config_lib.sampler_config(run.config))
    assert set(compare.CaptionMetrics.names) | set(compare.CaptionMetrics.cost) <= set(scores)
    assert scores["caption_nfe"] > 0 and scores["caption_latency_s"] > 0 and 0 <= scores["BLEU-4"] <= 1
