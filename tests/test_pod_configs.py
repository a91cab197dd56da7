"""The paper-scale configs (reference §6) and their AR+FM baselines (configs/ar_*.py, reference §7): they load and
validate, their parameter counts are the Llama backbones plus the OneFlow (or AR) heads, and `python -m oneflow_jax.aot` of the 1B
layout runs on 8 fake CPU devices for both model types."""
import math
import os
import re
import subprocess
import sys

import jax
import pytest

from oneflow_jax import config_lib, methods
from oneflow_jax.training import aot
from oneflow_jax.training import flops
from oneflow_jax.cli import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Reference §6, written out independently of the configs: (d, layers, heads, kv_heads, ffn, tied).
LLAMA = {"1b": (2048, 16, 32, 8, 8192, True), "3b": (3072, 28, 24, 8, 8192, True),
         "8b": (4096, 32, 32, 8, 14336, False)}
VOCAB = 128256
PUBLISHED = {"1b": 1.24e9, "3b": 3.21e9, "8b": 8.03e9}    # Hugging Face model cards
MODELS = ("oneflow", "ar")                                  # configs/oneflow_<size>.py, configs/ar_<size>.py
CONFIGS = [(model, size) for model in MODELS for size in sorted(LLAMA)]


def load(size, arg=None, model="oneflow"):
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"{model}_{size}", os.path.join(REPO, f"configs/{model}_{size}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def llama_params(d, layers, heads, kv, ffn, tied):
    """Embedding + layers (4 attention projections, 3 MLP matrices, 2 norms) + final norm (+ LM head if untied)."""
    hd = d // heads
    layer = d * heads * hd * 2 + d * kv * hd * 2 + 3 * d * ffn + 2 * d
    return VOCAB * d * (1 if tied else 2) + layers * layer + d


def added_heads(d, model="oneflow", patch_dim=64, grid=16, time_dim=256):
    """What OneFlow adds: insert head (pi, lambda), patch in/out, the t_img MLP, the patch row/col tables. The AR
    baseline adds the same minus the insert head."""
    insert = 0 if model == "ar" else 2 * d + 2
    return insert + (patch_dim * d + d) + (d * patch_dim + patch_dim) + (time_dim * d + d + d * d + d) + 2 * grid * d


@pytest.mark.parametrize("model,size", CONFIGS)
def test_configs_load_and_validate(model, size):
    config = load(size, model=model)
    config_lib.validate(config, 256)
    assert config.get("model_type", "oneflow") == model
    assert (config.data.seq_len, config.data.global_batch_size) == (512, 4096)
    assert config.codec.name == "vae" and config.codec.image_size == 256 and config.data.latents
    assert config.model.dtype == "bfloat16" and config.model.param_dtype == "float32" and config.model.scan_layers
    assert config.model.remat != "none" and config.model.vocab_size == VOCAB
    config_lib.validate(load(size, "tp4", model), 256)
    multi = load(size, "slices2", model)
    assert (multi.mesh.data, multi.mesh.num_slices) == (2, 2)
    config_lib.validate(multi, 512)
    config_lib.validate(load(size, "cpu", model), 8)
    with pytest.raises(ValueError, match="unknown variant"):
        load(size, "tpx", model)


@pytest.mark.parametrize("size", sorted(LLAMA))
def test_ar_configs_are_the_oneflow_configs_but_model_type(size):
    """configs/ar_<size>.py loads oneflow_<size>.py: only model_type and the `ar` section differ, variants included."""
    for arg in (None, "cpu", "slices2,tp2"):
        oneflow, ar = load(size, arg).to_dict(), load(size, arg, model="ar").to_dict()
        assert ar.pop("model_type") == "ar" and oneflow.pop("model_type") == "oneflow"
        assert ar.pop("ar") == {"cond_t_min": 0.5}
        assert ar == oneflow


@pytest.mark.parametrize("model,size", CONFIGS)
def test_param_counts_are_llama_plus_heads(model, size):
    d, layers, heads, kv, ffn, tied = LLAMA[size]
    config = load(size, model=model)
    cfg = flops.model_config_from(config)
    backbone = llama_params(d, layers, heads, kv, ffn, tied)
    assert backbone == pytest.approx(PUBLISHED[size], rel=0.005)
    assert (cfg.num_patches, cfg.patch_dim) == (256, 64)
    assert flops.params(cfg, model) == backbone + added_heads(d, model)
    assert flops.params(cfg, model) - backbone < 0.01 * backbone
    report = flops.report(config)                               # what `python -m oneflow_jax.flops --json` prints
    assert report["model_type"] == model and report["params"] == backbone + added_heads(d, model)
    # ... and the parameter tree of the model train_state.build_model makes (eval_shape: nothing is allocated)
    from oneflow_jax.models.transformer import dummy_batch
    from oneflow_jax.training.train_state import build_model
    net, _ = build_model(config, VOCAB)
    tree = jax.eval_shape(lambda rng: net.init(rng, dummy_batch(net.cfg)), jax.random.key(0))
    assert sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)) == backbone + added_heads(d, model)


@pytest.mark.parametrize("model", MODELS)
def test_aot_of_the_1b_layout_on_8_fake_devices(model):
    """The real CLI, no data: prints the memory lines; params + Adam state (12 bytes/param) are sharded 8 ways."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "oneflow_jax.aot", "--config", f"configs/{model}_1b.py:cpu",
                           "--config.mesh.fsdp=8"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"compiled train step ({model}): mesh {{'data': 1, 'fsdp': 8, 'tensor': 1}} on 8 cpu device(s)" \
        in proc.stdout
    gib = {}
    for key in ("argument", "output", "temp", "total"):
        m = re.search(rf"^\s*{key}:\s+(\d+\.\d+) GiB per device$", proc.stdout, re.M)
        assert m, proc.stdout
        gib[key] = float(m.group(1))
    n_params = flops.params(flops.model_config_from(load("1b", "cpu", model=model)), model)
    assert gib["argument"] == pytest.approx(12 * n_params / 8 / 2**30, rel=0.05)
    assert gib["total"] >= gib["argument"] + gib["temp"] - 0.01


def test_named_topology_needs_libtpu_here():
    import importlib.util
    if importlib.util.find_spec("libtpu"):
        pytest.skip("libtpu is installed: the AOT path is live")
    with pytest.raises(UserError, match="needs libtpu"):
        aot.topology_devices("v5e-256")
    with pytest.raises(UserError, match="unknown TPU topology"):
        aot.topology_devices("v9z-3")
    config = load("1b", "cpu")
    config.mesh.compile_topology = "v5p-128"
    with pytest.raises(UserError, match="needs libtpu"):
        aot.target_mesh(config)


def test_abstract_batch_matches_the_packer():
    cfg = flops.model_config_from(load("1b", "cpu"))
    config = load("1b", "cpu")
    config.data.update(seq_len=512, max_deletions=300)
    struct = methods.get("oneflow").batch_structure(config_lib.resolve(config), cfg)
    assert struct["patches"] == ((512, 64), struct["patches"][1])
    assert struct["del_tokens"][0] == (300,)
    assert struct["tokens"][1] == jax.numpy.int32 and struct["is_patch"][1] == bool
    from oneflow_jax.models import ar_transformer as ar_model
    from oneflow_jax.objectives import ar_objective
    ar = methods.get("ar").batch_structure(config_lib.resolve(load("1b", "cpu", model="ar")), cfg)
    assert set(ar) == set(ar_objective.POSITION_FIELDS) | {"segment_ids", "positions"} >= set(ar_model.MODEL_INPUTS)
    assert all(shape[0] == 512 for shape, _ in ar.values())     # every AR field is per position: no deletion bags
    assert ar["patches"][0] == (512, 64) and ar["targets"][1] == jax.numpy.int32 and ar["block_ids"][1] == "int32"


def test_tpu_pod_launcher_dry_run():
    env = dict(os.environ, DRY_RUN="1", TPU_NAME="t1", ACCELERATOR="v5p-256", SPOT="1")
    args = ["bash", "launch/tpu_pod.sh", "--config", "configs/oneflow_1b.py", "--workdir", "gs://b/runs/1b",
            "--config.total_steps=7"]
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "queued-resources create t1 --node-id t1 --accelerator-type v5p-256" in out and "--spot" in out
    assert out.count("--worker=all") == 2                       # install, then the same train command everywhere
    assert "python -m oneflow_jax.train --distributed --config configs/oneflow_1b.py --workdir gs://b/runs/1b" \
        " --config.total_steps=7" in out
    assert "launch/check_done.py gs://b/runs/1b" in out
    local = subprocess.run(args[:5] + ["/tmp/local"], cwd=REPO, env=env, capture_output=True, text=True)
    assert local.returncode == 2 and "gs://" in local.stderr
    typo = subprocess.run(args + ["--config.model.nope=1"], cwd=REPO, env=env, capture_output=True, text=True)
    assert typo.returncode == 2 and "queued-resources" not in typo.stdout   # preflight stops before provisioning


def test_check_done(tmp_path):
    (tmp_path / "config.json").write_text('{"total_steps": 20}')
    run = lambda: subprocess.run([sys.executable, "launch/check_done.py", str(tmp_path)], cwd=REPO,
                                 capture_output=True, text=True).returncode
    assert run() == 3
    (tmp_path / "checkpoints" / "10").mkdir(parents=True)
    (tmp_path / "checkpoints" / "20.orbax-checkpoint-tmp-1").mkdir()
    assert run() == 3
    (tmp_path / "checkpoints" / "20").mkdir()
    assert run() == 0
