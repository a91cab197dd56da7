"""The FLOP comparison (evals/compare.py, evals/compare_report.py): parity read along curves, the tuning choice, run
configs, the useful FLOPs of really packed documents, and the compare CLI end to end (tiny, resumable)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from oneflow_jax.evals import compare, compare_report

pytest.register_assert_rewrite("cli_utils")
from cli_utils import assert_one_line_error  # noqa: E402

pytest_plugins = ("cli_utils",)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(arg=None):
    import importlib.util
    spec = importlib.util.spec_from_file_location("compare_cfg", os.path.join(REPO, "configs/compare_shapes.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_first_reach_interpolates_and_says_when_it_is_a_bound():
    curve = [(1.0, 0.2), (3.0, 0.6), (5.0, 0.5), (9.0, 0.9)]
    assert compare_report.first_reach(curve, 0.4) == (pytest.approx(2.0), "exact")
    assert compare_report.first_reach(curve, 0.55) == (pytest.approx(2.75), "exact")   # the first crossing
    assert compare_report.first_reach(curve, 0.1) == (1.0, "upper")
    assert compare_report.first_reach(curve, 0.95) == (None, "never")


def test_parity_kinds_and_the_papers_definition():
    of = [(1.0, 0.1), (2.0, 0.5), (4.0, 0.8)]
    ar = [(1.0, 0.4), (2.0, 0.8), (4.0, 1.0)]
    p = compare_report.parity_at(of, ar, 0.6)                 # OneFlow 2 + 2/3, AR 1.5
    assert p["kind"] == "=" and p["ratio"] == pytest.approx((2 + 2 / 3) / 1.5)
    assert compare_report.parity_at(of, ar, 0.9) == dict(target=0.9, ratio=pytest.approx(4.0 / 3.0), kind=">")
    assert compare_report.parity_at(of, ar, 0.3)["kind"] == ">="          # AR at most its first FLOPs: ratio at least
    assert compare_report.parity_at(ar, of, 0.9)["kind"] == "<"           # roles swapped: the other never does
    assert compare_report.parity_at(of, ar, 1.5)["ratio"] is None
    points = lambda c: [dict(train_flops=f, acc=s) for f, s in c]
    out = compare_report.parity(points(of), points(ar), "acc", [0.5, 1.0])
    assert out["of_baseline_final"]["0.5"]["ratio"] == pytest.approx(2.0 / 1.25)   # target 0.5
    assert out["of_baseline_final"]["1"]["kind"] == ">"
    assert out["paper"] == dict(ratio=1.0, kind=">")                       # OneFlow's 4 FLOPs / AR's 4, not reached
    assert out["of_oneflow_final"]["1"]["ratio"] == pytest.approx(4.0 / 2.0)   # AR reaches 0.8 at 2


def test_mean_curve_and_equal_quality_cost():
    def rec(scores):
        return dict(points=[dict(step=s, train_flops=10.0 * s, train_flops_causal=9.0 * s, useful_train_flops=5.0 * s,
                                 acc=a, nfe=n) for s, a, n in scores])
    curve = compare_report.mean_curve([rec([(1, 0.2, 4), (2, 0.6, 6)]), rec([(1, 0.4, 6), (2, 0.8, None)])],
                                      ["acc"], ["nfe"])
    assert [p["step"] for p in curve] == [1, 2] and curve[1]["seeds"] == 2
    assert curve[0]["acc"] == pytest.approx(0.3) and curve[0]["acc_range"] == [0.2, 0.4]
    assert curve[1]["nfe"] == 6.0 and curve[0]["nfe"] == 5.0
    of = [dict(step=1, train_flops=1, acc=0.3, nfe=7), dict(step=2, train_flops=2, acc=0.9, nfe=7)]
    ar = [dict(step=1, train_flops=1, acc=0.7, nfe=15), dict(step=2, train_flops=2, acc=0.8, nfe=15)]
    e = compare_report.equal_quality_cost(of, ar, "acc", ["nfe"])
    assert e["quality"] == 0.8 and e["oneflow"]["step"] == 2 and e["baseline"]["step"] == 2 and e["baseline"]["nfe"] == 15


def test_tuning_then_sweep_specs_and_the_best_choice():
    config = load_config()
    config.compare.models = ("oneflow", "ar")
    lr_runs = compare.tuning_specs(config)
    assert {(s.model, s.lr, s.width, s.seed) for s in lr_runs} == {
        (m, lr, 64, 0) for m in ("oneflow", "ar") for lr in (1e-3, 2e-3, 4e-3)}
    scores = {1e-3: 0.2, 2e-3: 0.7, 4e-3: 0.5}
    records = {s.name: dict(points=[dict(caption_accuracy=scores[s.lr] + (0.1 if s.model == "ar" and s.lr == 4e-3
                                                                           else 0.0),
                                         generation_accuracy=0.5)]) for s in lr_runs}
    best = compare.best_settings(records, lr_runs, compare.ShapesWorldMetrics)
    assert best == {"oneflow": (2e-3, 4.0), "ar": (2e-3, 4.0)}        # 4e-3 + 0.1 ties AR's 2e-3: the first wins
    assert compare.edge_extensions(config, lr_runs, {"oneflow": 2e-3, "ar": 2e-3}) == []
    past = compare.edge_extensions(config, lr_runs, {"oneflow": 4e-3, "ar": 1e-3})
    assert [(s.model, s.lr) for s in past] == [("oneflow", 8e-3), ("ar", 5e-4)]
    weight_runs = compare.tuning_specs(config, {m: lr for m, (lr, _) in best.items()})
    assert [(s.model, s.lr, s.image_loss_weight) for s in weight_runs] == [("oneflow", 2e-3, 1.0), ("ar", 2e-3, 1.0)]
    sweep = compare.sweep_specs(config, {"oneflow": (2e-3, 1.0), "ar": (4e-3, 4.0)})
    assert [s.seed for s in sweep] == [0] * 6 + [1] * 6                   # every size gets a seed before any two
    assert sweep[0].name == "d64/oneflow_lr0.002_w1_s0" and sweep[1].name == "d64/ar_lr0.004_w4_s0"
    assert config.compare.lr_scaling == "inverse_width"                    # the default: lr x 64 / width
    assert [s.lr for s in sweep][:6] == pytest.approx([2e-3, 4e-3, 1e-3, 2e-3, 5e-4, 1e-3])
    run = compare.run_config(config, sweep[5])
    assert (run.model_type, run.model.d_model, run.model.d_ff, run.optimizer.lr) == ("ar", 256, 768, 1e-3)
    config.compare.lr_scaling = "constant"
    assert [s.lr for s in compare.sweep_specs(config, {"oneflow": (2e-3, 1.0), "ar": (4e-3, 4.0)})][:6] == \
        pytest.approx([2e-3, 4e-3] * 3)
    steps = compare.eval_steps(config)
    assert steps == [375, 750, 1500, 2250, 3000] and run.ckpt_every == 375 and run.sample_every == 0
    assert run.keep_checkpoints >= len(steps)


def test_nextflow_is_a_third_model_with_its_own_codec_rows_and_tokenizer(tmp_path):
    config = load_config()
    assert compare.models(config) == ("oneflow", "ar", "nextflow") and compare.vq_models(config) == ["nextflow"]
    weight_runs = compare.tuning_specs(config, {"oneflow": 2e-3, "ar": 4e-3, "nextflow": 1e-3})
    assert [(s.model, s.image_loss_weight) for s in weight_runs] == [("oneflow", 1.0), ("ar", 1.0), ("nextflow", 4.0)]
    spec = compare.RunSpec(128, "nextflow", 1e-3, 1.0, 1)
    run = compare.run_config(config, spec, str(tmp_path))
    assert (run.model_type, run.model.d_model, run.model.d_ff, run.model.patch_head_hidden) == ("nextflow", 128, 384, 0)
    assert run.codec.name == "vq" and run.codec.tokenizer == os.path.join(str(tmp_path), "vq")
    assert run.data.seq_len == 256 and run.sampler.image_cfg == 3.0 and run.nextflow.cond_drop == 0.1
    other = compare.run_config(config, compare.RunSpec(128, "ar", 1e-3, 4.0, 1), str(tmp_path))
    assert other.codec.name == "pixel_patch" and other.data.seq_len == 128       # overrides touch NextFlow only
    for bad in (("ar", "oneflow"), ("oneflow",), ("oneflow", "ar", "ar"), ("oneflow", "gpt")):
        config.compare.models = bad
        with pytest.raises(compare.cli.UserError, match="compare.models must be 'oneflow' then"):
            compare.settings(config)


@pytest.mark.parametrize("method", ["oneflow", "ar"])
def test_useful_flops_are_measured_on_the_packed_documents(cli, method):
    from oneflow_jax import config_lib
    from oneflow_jax.data import input_pipeline
    from oneflow_jax.training import flops
    from oneflow_jax.training.train_state import build_model
    config = compare.run_config(load_config("tiny"), compare.RunSpec(32, method, 2e-3, 4.0, 0))
    config.data.data_dir = str(cli.data_dir)
    run = config_lib.resolve(config)
    tok = input_pipeline.get_tokenizer(run.data)
    model, codec = build_model(run, tok.vocab_size)
    out = flops.measured_useful_flops(run, model.cfg, tok, codec, num_batches=3)
    batch = next(input_pipeline.create_train_iterator(run, process_index=0, process_count=1, codec=codec,
                                                      tokenizer=tok, seed=run.seed))
    docs = flops.packed_documents(batch)
    seg = np.asarray(batch["segment_ids"])
    assert len(docs) == sum(len(np.unique(r[r > 0])) for r in seg)
    assert sum(d["length"] for d in docs) == np.count_nonzero(seg)
    assert sum(d["patch_positions"] for d in docs) == np.count_nonzero(np.asarray(batch["is_patch"]) & (seg > 0))
    device = flops.train_flops_per_step(model.cfg, run.data, method)
    assert 0 < out["useful_train_flops_per_step"] < device
    assert 0 < out["packing_fill"] <= 1 and out["documents_per_row"] >= 1


def test_compare_cli_tiny_end_to_end_resumable_and_reusable(cli, tmp_path):
    """OneFlow against NextFlow (AR+FM runs the same code path as OneFlow; the default's three models: above)."""
    wd, models = tmp_path / "cmp", "--config.compare.models=('oneflow', 'nextflow')"
    first = cli.run("compare", "--config=configs/compare_shapes.py:tiny", models, f"--workdir={wd}").check()
    assert "compare: training the VQ tokenizer of nextflow" in first.stdout, first
    assert "compare: [tuning lr 1/2] training d32/oneflow_lr0.002_w4_s0" in first.stdout, first
    result = json.loads((wd / "compare.json").read_text())
    assert result["best"] == {"oneflow": [0.002, 4.0], "nextflow": [0.002, 4.0]}
    assert set(result["parity"]["d32"]["nextflow"]) == {"caption_accuracy", "generation_accuracy"}
    assert result["config"]["compare"]["widths"] == [32] and "commit" in result
    tok = result["tokenizer"]                   # reported apart: 6 steps of the tiny tokenizer
    assert tok["steps"] == 6 and tok["train_flops"] == 6 * tok["train_flops_per_step"] > 0
    for model in ("oneflow", "nextflow"):
        run = result["runs"][f"d32/{model}_lr0.002_w4_s0"]
        assert [p["step"] for p in run["points"]] == [4]
        p = run["points"][-1]
        assert p["train_flops"] == 4 * run["train_flops_per_step"]
        assert p["useful_train_flops"] < p["train_flops"]
        assert (p["train_flops_causal"] < p["train_flops"]) == (model != "oneflow")
        assert p["caption_nfe"] >= 1 and p["caption_latency_s"] > 0 and p["generation_nfe"] >= 1
    md = (wd / "compare.md").read_text()
    assert md.startswith("# OneFlow vs NextFlow") and "## Parity FLOP ratio" in md and "## Tuning" in md
    assert "## VQ tokenizer" in md and "| d32 | 0.12M | NextFlow | caption_accuracy |" in md
    rows = [json.loads(line) for line in (wd / "compare.jsonl").read_text().splitlines()]
    assert sorted(r["kind"] for r in rows) == ["parity"] * 2 + ["run"] * 2 + ["tokenizer"] + ["tuning"] * 2
    assert all(r["commit"] == result["commit"] and r["date"] for r in rows)
    for png in ("compare_curves.png", "compare_parity.png"):
        assert (wd / png).read_bytes()[:4] == b"\x89PNG"
    os.remove(wd / "runs/d32/oneflow_lr0.002_w4_s0/compare_eval/step_4.json")
    again = cli.run("compare", "--config=configs/compare_shapes.py:tiny", models, f"--workdir={wd}").check()
    assert "] training" not in again.stdout and "train step" not in again.stdout, again   # finished: skipped
    assert "compare: training the VQ tokenizer" not in again.stdout, again
    evaluated = [line for line in again.stdout.splitlines() if line.startswith("compare: d32/")]
    assert len(evaluated) == 1 and "d32/oneflow_lr0.002_w4_s0 step 4:" in evaluated[0], again.stdout
    result = json.loads((wd / "compare.json").read_text())
    assert result["runs"].keys() == {f"d32/{m}_lr0.002_w4_s0" for m in ("oneflow", "nextflow")}
    # --reuse: a new comparison takes the runs of this one's compare.jsonl (as if trained at commit 'elsewhere') as
    # finished, trains and evaluates nothing, and reports the tokenizer with them
    wd2, earlier = tmp_path / "cmp2", tmp_path / "earlier.jsonl"
    earlier.write_text("".join(json.dumps(dict(json.loads(line), commit="elsewhere")) + "\n"
                               for line in (wd / "compare.jsonl").read_text().splitlines()))
    reused = cli.run("compare", "--config=configs/compare_shapes.py:tiny", models, f"--workdir={wd2}",
                     f"--reuse={earlier}", "--report_only").check()
    assert "compare: 2 runs imported" in reused.stdout and "compare: d32/" not in reused.stdout, reused
    result2 = json.loads((wd2 / "compare.json").read_text())
    for name, run in result["runs"].items():
        assert result2["runs"][name]["points"] == run["points"]
        assert result2["runs"][name]["imported"]["commit"] == "elsewhere"
    assert result2["parity"] == result["parity"] and result2["best"] == result["best"]
    assert result2["tokenizer"]["psnr"] == tok["psnr"] and result2["tokenizer"]["imported"]["commit"] == "elsewhere"
    assert "(imported, elsewhere)." in (wd2 / "compare.md").read_text()
    # reusing the reuse keeps where the runs were trained
    config = load_config("tiny")
    assert set(compare.import_runs(config, str(tmp_path / "cmp3"), str(wd2 / "compare.jsonl"))) == set(result["runs"])
    for name in result["runs"]:
        assert json.loads((tmp_path / "cmp3/runs" / name / "imported.json").read_text())["commit"] == "elsewhere"
    config.budget = 0.5
    with pytest.raises(compare.cli.UserError, match="has {'budget': 1.0"):
        compare.import_runs(config, str(tmp_path / "cmp4"), str(wd / "compare.jsonl"))


def test_compare_report_only_trains_nothing(cli, tmp_path):
    res = cli.run("compare", "--config=configs/compare_shapes.py:tiny", f"--workdir={tmp_path}", "--report_only").check()
    assert "training" not in res.stdout and not (tmp_path / "runs").exists(), res
    result = json.loads((tmp_path / "compare.json").read_text())
    assert result["runs"] == {} and result["best"] is None and result["tuning"] == []


def test_compare_cli_bad_config_is_one_line(cli, tmp_path):
    res = cli.run("compare", "--config=configs/compare_shapes.py:tiny", "--config.compare.metric_set=cider",
                  f"--workdir={tmp_path}")
    assert_one_line_error(res, "compare.metric_set 'cider' is not one of")
    res = cli.run("compare", "--config=configs/shapes_tiny.py", f"--workdir={tmp_path}")
    assert_one_line_error(res, "must be a comparison config")


def test_flops_cli_measures_packed_documents(cli):
    """`flops --measure_batches`: OneFlow's rows hold more (shorter, noised) documents than AR's clean ones."""
    out = {}
    for name in ("shapes_tiny", "ar_shapes_tiny"):
        res = cli.run("flops", f"--config=configs/{name}.py:smoke", "--measure_batches=4", "--json").check()
        out[name] = json.loads(res.stdout.strip().splitlines()[-1])
    of, ar = out["shapes_tiny"], out["ar_shapes_tiny"]
    assert of["measured_documents_per_row"] > 1.2 * ar["measured_documents_per_row"], (of, ar)
    assert of["measured_positions_per_document"] < ar["measured_positions_per_document"]
    for o in (of, ar):
        assert 0 < o["measured_useful_flops_fraction"] < 1 and o["measured_useful_flops_batches"] == 4
