"""The multi-scale residual VQ tokenizer (models/vq.py) and its trainer (train_vq.py): token-map shapes, what round
trips exactly, the causality of VAR's teacher-forcing inputs, training, and the CLI (resume, one-line errors)."""
import json

import jax
import ml_collections
import numpy as np
import pytest

from oneflow_jax.training import vq_trainer
from oneflow_jax.data import shapes_world
from oneflow_jax.models import vq

pytest.register_assert_rewrite("cli_utils")
from cli_utils import assert_one_line_error, checkpoint_steps, metrics_by_step, resumed_step  # noqa: E402

pytest_plugins = ("cli_utils",)

CFG = vq.VQConfig(channels=(8, 16), downsample=2, code_dim=8, codebook_size=32, scales=(1, 4, 16), restart_every=4)
SMOKE = "configs/vq_shapes_tiny.py:smoke"


def shapes_images(n: int) -> np.ndarray:
    docs = (shapes_world.generate_document("train", i) for i in range(n))
    return np.concatenate([d.images for d in docs])[:n]


@pytest.fixture(scope="module")
def model():
    """Random params with the codebook spread like features (a fresh one, uniform in [0, 2 / V), would put most
    vectors on one code), and token maps of real shapes-world images."""
    params = vq.init_params(CFG, seed=0)
    params["codebook"] = np.random.default_rng(1).standard_normal(params["codebook"].shape).astype(np.float32)
    images = shapes_images(4)
    return params, images, vq.encode(CFG, params, images)


def test_token_maps_have_one_map_per_scale_inside_the_codebook(model):
    _, images, tokens = model
    assert len(tokens) == len(CFG.scales)
    for t, s in zip(tokens, CFG.scales):
        assert t.shape == (len(images), s, s) and t.dtype == np.int32
        assert 0 <= int(t.min()) and int(t.max()) < CFG.codebook_size
    assert len(np.unique(np.concatenate([np.ravel(t) for t in tokens]))) > 3     # not collapsed onto one code


def test_what_round_trips_exactly(model):
    """Exact on the codebook: (1) f_hat is a function of the tokens alone: the quantiser's own f_hat inside the
    training forward pass equals `fhat_from_tokens(encode(x))`, and `decode(tokens)` is the forward pass's
    reconstruction; (2) re-quantising any scale's code vectors Z[r_k] returns r_k (the nearest-code lookup is
    idempotent on the codebook). Not exact, by design: encode(decode(tokens)) through pixels (a lossy decoder and
    encoder); train_vq's eval reports that agreement per scale."""
    params, images, tokens = model
    forward = jax.jit(lambda p, x: vq.VQModel(CFG).apply({"params": p}, vq.to_float(x)))
    recon, aux = forward(params, images)
    f_hat = vq.fhat_from_tokens(CFG, params, tokens)
    np.testing.assert_allclose(f_hat, aux["f_hat"], rtol=1e-5, atol=1e-5)
    for got, want in zip(aux["tokens"], tokens):
        np.testing.assert_array_equal(got, want)
    decoded = vq.decode(CFG, params, tokens).astype(int)
    assert np.abs(decoded - np.asarray(vq.to_uint8(recon), int)).max() <= 1      # float rounding at .5 only
    codebook = np.asarray(params["codebook"])
    for t in tokens:
        vectors = codebook[t]                                                     # [B, s, s, C]
        d = ((vectors[..., None, :] - codebook) ** 2).sum(-1)
        np.testing.assert_array_equal(d.argmin(-1), t)
    coarse = vq.decode(CFG, params, tokens[:2])                                   # a prefix decodes too
    assert coarse.shape == images.shape and coarse.dtype == np.uint8


def test_next_scale_inputs_shapes_and_causality(model):
    params, _, tokens = model
    inputs = vq.next_scale_inputs(CFG, params, tokens)
    assert [x.shape for x in inputs] == [(4, s * s, CFG.code_dim) for s in CFG.scales[1:]]
    f_hat_2 = vq.fhat_from_tokens(CFG, params, tokens[:2])      # input 1 = f_hat after scales 0, 1 at scale 2's size
    want = np.asarray(vq.area_down(f_hat_2, CFG.scales[2])).reshape(4, -1, CFG.code_dim)
    np.testing.assert_allclose(inputs[1], want, rtol=1e-5, atol=1e-6)
    for j in range(1, len(CFG.scales)):                         # change scale j: inputs 0..j-1 stay, input j moves
        changed = list(tokens)
        changed[j] = (tokens[j] + 1) % CFG.codebook_size
        moved = vq.next_scale_inputs(CFG, params, changed)
        for k in range(j):
            np.testing.assert_array_equal(moved[k], inputs[k])
        if j < len(inputs):
            assert not np.allclose(moved[j], inputs[j])
    assert len(vq.next_scale_inputs(CFG, params, tokens[:1])) == 1              # a prefix gives the inputs it implies


def test_resizing_is_torchs_area_and_bicubic_interpolation():
    """VAR's F.interpolate(mode='area') and (mode='bicubic', align_corners=False); golden values from torch 2."""
    x = np.arange(2 * 6 * 6 * 1, dtype=np.float32).reshape(2, 6, 6, 1)
    np.testing.assert_allclose(vq.area_down(x, 3), x.reshape(2, 3, 2, 3, 2, 1).mean((2, 4)), rtol=1e-6)
    row = vq._area_matrix(4, 6)                                  # uneven: windows [0,2) [1,3) [3,5) [4,6)
    np.testing.assert_allclose(row @ np.arange(6.0), [0.5, 1.5, 3.5, 4.5])
    up = vq.cubic_up(np.array([[0.0, 1.0], [3.0, 2.0]], np.float32)[None, :, :, None], 4)[0, :, :, 0]
    torch_bicubic = [[-0.444122, -0.042053, 0.620178, 1.022247], [0.622009, 0.803589, 1.102661, 1.284241],
                     [2.377991, 2.196411, 1.897339, 1.715759], [3.444122, 3.042053, 2.379822, 1.977753]]
    np.testing.assert_allclose(up, torch_bicubic, atol=1e-5)
    np.testing.assert_allclose(vq.cubic_up(np.full((1, 1, 1, 2), 3.0, np.float32), 8), 3.0)   # 1x1: a constant


def test_training_reduces_the_loss_and_restarts_dead_codes():
    """The default EMA codebook here; the CLI test trains the smoke config, whose codebook learns by its loss."""
    opt = ml_collections.ConfigDict(dict(lr=3e-3, min_lr_ratio=1.0, warmup_steps=1, b1=0.9, b2=0.99, grad_clip=1.0))
    tx, schedule = vq_trainer.make_optimizer(opt, 12)
    state = vq_trainer.create_state(CFG, tx, seed=0)
    step = vq_trainer.make_train_step(CFG, tx, schedule, seed=0)
    images = shapes_images(16)
    losses, restarted = [], 0
    for _ in range(12):
        state, metrics = step(state, images)
        losses.append(float(metrics["loss"]))
        restarted += int(metrics["restarted"])
    assert np.isfinite(losses).all() and np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    assert restarted > 0, "a fresh 32-code book leaves codes unused in the first window"
    assert int(state["step"]) == 12


# ------------------------------------------------------------------------------------------------ the command
BAD_INPUTS = {
    "no_workdir": ((f"--config={SMOKE}",), "--workdir are required"),
    "scales": ((f"--config={SMOKE}", "--config.vq.scales=(1,4,8)"), "must end at the feature size"),
    "variant": (("--config=configs/vq_shapes_tiny.py:nope",), "unknown variant"),
}


@pytest.fixture(scope="module", autouse=True)
def first_runs(cli, tmp_path_factory):
    """Started before this file's first test, so that they run while the tests above do: the smoke config trained for
    4 of its 6 steps, and every bad input of BAD_INPUTS (each fails before training)."""
    workdir = tmp_path_factory.mktemp("vq") / "run"
    train = cli.start("train_vq", f"--config={SMOKE}", f"--workdir={workdir}", "--config.total_steps=4")
    bad = {name: cli.start("train_vq", *(args if name == "no_workdir" else (*args, f"--workdir={workdir}_bad")))
           for name, (args, _) in BAD_INPUTS.items()}
    return workdir, train, bad


def test_cli_trains_resumes_and_evaluates(cli, first_runs):
    workdir, started, _ = first_runs
    first = started.wait().check()
    assert "vq step 4/4" in first.stdout and "steps/s" in first.stdout and "ETA" in first.stdout, first
    assert checkpoint_steps(workdir) == [3, 4]
    second = cli.run("train_vq", f"--config={SMOKE}", f"--workdir={workdir}").check()   # total_steps 6: resumes
    assert resumed_step(second) == 4, second
    rows = metrics_by_step(workdir)                                   # fails on a step logged twice
    assert sorted(rows) == [2, 4, 6]
    for key in ("loss", "recon_mse", "psnr", "codebook_usage", "perplexity", "restarted_codes", "steps_per_sec"):
        assert np.isfinite(rows[6][key]), (key, rows[6])
    scores = json.loads((workdir / "eval.json").read_text())
    assert scores["num_images"] >= 16 and np.isfinite(scores["psnr"]) and 0 <= scores["attributes_recognised"] <= 1
    assert (workdir / "reconstructions.png").stat().st_size > 0
    cfg, params = vq.load_tokenizer(str(workdir))
    assert cfg.codebook_update == "loss"
    tokens = vq.encode(cfg, params, shapes_images(2))
    assert [t.shape for t in tokens] == [(2, s, s) for s in cfg.scales]


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2(first_runs, name):
    result = first_runs[2][name].wait()
    assert result.returncode == 2, result
    assert_one_line_error(result, BAD_INPUTS[name][1])
