"""The sample and eval CLIs on a trained smoke run (`trained_run` from cli_utils.py), as users run them: the files
they write, and one-line errors (no traceback) for bad inputs."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from oneflow_jax.data import shapes_world as sw
from oneflow_jax.evals.shapes_eval import first_caption

pytest.register_assert_rewrite("cli_utils")
from cli_utils import assert_one_line_error, copy_workdir  # noqa: E402

pytest_plugins = ("cli_utils",)


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    """A 32x32 RGB PNG (the codec's resolution, so it is used unresized)."""
    path = tmp_path_factory.mktemp("inputs") / "x.png"
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _markers(text_file) -> int:
    return text_file.read_text().count("<image>")


def test_sample_prompt_with_an_image(cli, trained_run, png, tmp_path):
    out = tmp_path / "samples"
    result = cli.run("sample", f"--workdir={trained_run.workdir}", "--prompt=<image>", f"--image={png}",
                     "--num_samples=2", f"--out={out}").check()
    assert "from step 12" in result.stdout, str(result)
    for sample in ("00", "01"):
        text = out / f"0000_{sample}.txt"
        assert text.exists(), sorted(p.name for p in out.iterdir())
        images = sorted(out.glob(f"0000_{sample}_img*.png"))
        assert len(images) == _markers(text) >= 1          # one PNG per <image> marker of the document
        # The given image is the document's first image (through the codec's encode/decode round trip).
        first = np.asarray(Image.open(out / f"0000_{sample}_img0.png").convert("RGB"), np.int16)
        assert np.abs(first - np.asarray(Image.open(png), np.int16)).max() <= 2
    assert not list(out.glob("0001_*"))


def test_sample_prompts_file(cli, trained_run, png, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "<image>", "images": [png.name]}) + "\n"
                       + json.dumps({"prompt": "a red circle on the left"}) + "\n")
    (tmp_path / png.name).write_bytes(png.read_bytes())     # image paths are relative to the prompts file
    out = tmp_path / "samples"
    cli.run("sample", f"--workdir={trained_run.workdir}", f"--prompts_file={prompts}", f"--out={out}").check()
    assert sorted(p.name for p in out.glob("*.txt")) == ["0000_00.txt", "0001_00.txt"]
    assert (out / "0000_00_img0.png").exists()
    for text in out.glob("*.txt"):
        assert len(list(out.glob(f"{text.stem}_img*.png"))) == _markers(text)


def test_sample_generates_the_images_a_prompt_leaves_without_a_file(cli, trained_run, png, tmp_path):
    """Text-to-image from --prompt (a marker with no --image), and `null` in a prompts file's images list."""
    out = tmp_path / "t2i"
    cli.run("sample", f"--workdir={trained_run.workdir}", f"--out={out}",
            "--prompt=a red circle on the left and a blue square on the right <image>").check()
    text = (out / "0000_00.txt").read_text()
    assert text.startswith("a red circle on the left and a blue square on the right <image>")
    assert len(list(out.glob("0000_00_img*.png"))) == _markers(out / "0000_00.txt") >= 1
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "<image> then <image>", "images": [str(png), None]}) + "\n")
    out = tmp_path / "null"
    cli.run("sample", f"--workdir={trained_run.workdir}", f"--prompts_file={prompts}", f"--out={out}").check()
    assert (out / "0000_00_img0.png").exists() and (out / "0000_00_img1.png").exists()
    given = np.asarray(Image.open(out / "0000_00_img0.png"), np.int16)
    assert np.abs(given - np.asarray(Image.open(png), np.int16)).max() <= 2     # the given one is kept


SAMPLE_ERRORS = {   # name: (arguments after --workdir, expected words of the error line)
    "missing_image": (["--prompt=<image>", "--image={missing}"], "image not found"),
    "undecodable_image": (["--prompt=<image>", "--image={garbage}"], "cannot decode image"),
    "more_images_than_markers": (["--prompt=<image>", "--image={png}", "--image={png}"], "marker"),
    "empty_workdir": (["--prompt=<image>", "--image={png}"], "not a training run directory"),
    "nonexistent_workdir": (["--prompt=<image>", "--image={png}"], "not a training run directory"),
    "missing_step": (["--prompt=a", "--step=5"], "no checkpoint at step 5 (it has steps"),
    "prompts_line_without_prompt": (["--prompts_file={no_prompt}"], ':1: bad line (each line is an object'),
}


@pytest.fixture(scope="module")
def sample_error_results(cli, trained_run, png, tmp_path_factory):
    """Every bad-input sample command, run concurrently."""
    base = tmp_path_factory.mktemp("sample_errors")
    garbage = base / "garbage.png"
    garbage.write_bytes(b"this is not a PNG\x00\x01\x02" * 8)
    (base / "empty_workdir").mkdir()
    workdirs = {"empty_workdir": base / "empty_workdir", "nonexistent_workdir": base / "nonexistent"}
    (base / "no_prompt.jsonl").write_text('{"text": "a red circle"}\n')
    paths = dict(missing=base / "missing.png", garbage=garbage, png=png, no_prompt=base / "no_prompt.jsonl")
    commands = [("sample", [f"--workdir={workdirs.get(name, trained_run.workdir)}", f"--out={base / ('out_' + name)}",
                            *(a.format(**paths) for a in args)])
                for name, (args, _) in SAMPLE_ERRORS.items()]
    results = cli.run_many(commands, timeout=180)
    return dict(zip(SAMPLE_ERRORS, results)), base


@pytest.mark.parametrize("name", list(SAMPLE_ERRORS))
def test_sample_bad_input_is_a_one_line_error(sample_error_results, name):
    results, base = sample_error_results
    assert_one_line_error(results[name], SAMPLE_ERRORS[name][1])
    assert not (base / f"out_{name}").exists(), "nothing may be written on a bad input"


def test_eval_prints_the_table_and_writes_scores(cli, trained_run, tmp_path):
    workdir = copy_workdir(trained_run.workdir, tmp_path / "run")
    result = cli.run("eval", f"--workdir={workdir}", "--num_examples=8",
                     '--sampler={"max_insertions_per_step": 1, "finish_threshold": 0.5, "votes": 3}').check()
    assert "shapes-world eval @ step 12" in result.stdout, str(result)
    for row in ("caption ", "caption@1", "generation", "interleaved consistency", "most frequent of 3 samples"):
        assert row in result.stdout, str(result)
    scores = json.loads((workdir / "eval" / "step_12.json").read_text())
    assert {"caption", "caption_one_sample", "generation", "interleaved_consistency"} <= set(scores)
    assert scores["step"] == 12 and scores["caption"]["all"]["n"] == 8 and scores["caption"]["votes"] == 3
    assert scores["caption_one_sample"]["all"]["n"] == 8
    assert 0.0 <= scores["caption"]["all"]["accuracy"] <= 1.0
    logged = [json.loads(line) for line in (workdir / "eval" / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == 1 and logged[0]["step"] == 12                       # and as TensorBoard scalars
    assert logged[0]["shapes/caption/all/accuracy"] == scores["caption"]["all"]["accuracy"]
    free = scores["interleaved_consistency"]
    assert logged[0]["shapes/interleaved_consistency/n_pairs"] == free["n_pairs"]
    if free["n_pairs"]:            # a pair can agree only when its text parses
        assert 0.0 <= free["accuracy"] <= free["parsed"] <= 1.0, free
    assert any(p.name.startswith("events.out.tfevents") for p in (workdir / "eval" / "tb").iterdir())
    wrong = round((1 - scores["caption"]["all"]["accuracy"]) * 8)
    failures = scores["examples"]["caption_failures"]
    assert len(failures) == wrong, failures
    for f in failures:   # each truth is a well-formed caption the document did not reproduce
        truth = sw.parse_caption(f["truth"])
        assert truth is not None and f["document"].count("<image>") >= 1
        assert sw.parse_caption(first_caption(f["document"]) or "") != truth, f
    bad = cli.run("eval", f"--workdir={workdir}", '--sampler={"temprature": 0.3}')
    assert_one_line_error(bad, "unknown key(s) temprature")
    bad = cli.run("eval", f"--workdir={workdir}", '--sampler={"votes": 0}')
    assert_one_line_error(bad, "votes must be >= 1")


def test_benchmark_scripts_run(cli):
    """The benchmarks are user-facing commands too: each prints its JSON result (tiny settings)."""
    mfu = cli.run_script("benchmarks/mfu.py", "--config=configs/shapes_tiny.py:smoke", "--steps=1", "--warmup=0",
                         "--peak_n=128", "--peak_repeats=1").check()
    report = json.loads(mfu.stdout.strip().splitlines()[-1])
    assert report["steps_per_sec"] > 0 and 0 < report["mfu"] and report["params"] > 0
    synthetic = cli.run_script("benchmarks/mfu.py", "--config=configs/ar_shapes_tiny.py:smoke", "--synthetic",
                               "--steps=1", "--warmup=0", "--peak_n=128", "--peak_repeats=1",
                               "--config.data.global_batch_size=2").check()
    report = json.loads(synthetic.stdout.strip().splitlines()[-1])
    assert report["data"] == "synthetic" and 0 < report["packing_fill"] <= 1 and report["steps_per_sec"] > 0
    cost = cli.run_script("benchmarks/evaluation_cost.py", "--config=configs/shapes_tiny.py:smoke",
                          "--ar_config=configs/ar_shapes_tiny.py:smoke", "--batches=1", "--repeats=1",
                          "--inner=2", "--lengths=16").check()           # one length: each is a compile
    rows = [json.loads(line) for line in cost.stdout.strip().splitlines() if line.startswith("{")]
    assert [(r["model"], r["call"], r["positions"]) for r in rows] == [
        ("oneflow", "evaluation", 16), ("ar_fm", "prefill", 6), ("ar_fm", "decode step", 1)], str(cost)
    assert all(r["ms"] > 0 and r["batch"] == 1 for r in rows)
    pipe = cli.run_script("benchmarks/input_pipeline.py", "--num_workers=0", "--seq_len=128", "--batch=4",
                          "--batches=2", "--warmup=1").check()
    rows = [json.loads(line) for line in pipe.stdout.strip().splitlines() if line.startswith("{")]
    assert rows and all(r["rows_per_s"] > 0 for r in rows), str(pipe)


def test_votes_sample_captioning_prompts_k_times_and_keep_the_most_frequent_text(trained_run, png):
    """sampler.votes = 3: each prompt whose images are all given is sampled 3 times (rows of the batch, each its own
    random draws) and the sample with the most frequent text comes back; a prompt that generates an image is sampled
    once."""
    from oneflow_jax import config_lib
    from oneflow_jax.sampling import generate
    run = generate.load_run(str(trained_run.workdir))
    cfg = config_lib.sampler_config(run.config, votes=3)
    image = generate.load_png(str(png), run.codec)
    prompts = [generate.encode_prompt("<image>", [image], run.tokenizer, run.codec),
               generate.encode_prompt("a red circle on the left and a blue square on the right <image>", [None],
                                      run.tokenizer, run.codec),
               generate.encode_prompt("<image> a", [image], run.tokenizer, run.codec)]
    gen = generate.Generator(run, cfg, batch_size=8)
    docs = gen(prompts, seed=0)
    assert [len(s) for s in gen.samples] == [3, 1, 3]
    assert docs == [generate.most_common_text(s) for s in gen.samples]
    assert len(docs[1][1]) == 1 and docs[1][1][0].shape == (32, 32, 3)      # the generated image
    assert all(text.startswith("<image>") for text, _ in gen.samples[0] + gen.samples[2])
    assert len({text for text, _ in gen.samples[0] + gen.samples[2]}) > 1, gen.samples   # independent draws


def test_most_common_text_keeps_the_plurality_and_the_earliest_of_a_tie():
    from oneflow_jax.sampling.generate import most_common_text
    assert most_common_text([("x", 0), ("y", 1), ("y", 2)]) == ("y", 1)
    assert most_common_text([("a", 0), ("b", 1), ("b", 2), ("a", 3)]) == ("a", 0)
    assert most_common_text([("a", 0)]) == ("a", 0)
