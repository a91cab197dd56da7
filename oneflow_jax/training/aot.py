"""Compile the train step without running it ("fit before you pay"): abstract state and batch, the configured mesh on
this host's devices or on a named TPU topology (ahead-of-time, from a CPU host, where jaxlib has libtpu).

`python -m oneflow_jax.aot --config CONFIG` calls `compile_train_step` (for the config's method) and prints
`memory_lines`. Nothing here reads data, tokenizers or VAE weights: the vocabulary comes from
config.model.vocab_size (or the dataset's tokenizer when 0) and the latent geometry from the codec (shape-only for a
`vae` codec without `codec.path`).
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax

from oneflow_jax import config_lib, methods
from oneflow_jax.cli import UserError
from oneflow_jax.training import flops, sharding

# User-facing TPU names -> libtpu topology names (chips per slice). Raw '<gen>:<AxB[xC]>' names also work.
TOPOLOGIES = {
    **{f"v4-{2 * n}": f"v4:{s}" for n, s in ((4, "2x2x1"), (8, "2x2x2"), (16, "2x2x4"), (32, "2x4x4"),
                                             (64, "4x4x4"), (128, "4x4x8"), (256, "4x8x8"), (512, "8x8x8"))},
    **{f"v5p-{2 * n}": f"v5:{s}" for n, s in ((4, "2x2x1"), (8, "2x2x2"), (16, "2x2x4"), (32, "2x4x4"),
                                              (64, "4x4x4"), (128, "4x4x8"), (256, "4x8x8"), (512, "8x8x8"))},
    **{f"v5e-{n}": f"v5e:{s}" for n, s in ((16, "4x4"), (32, "4x8"), (64, "8x8"), (128, "8x16"), (256, "16x16"))},
    **{f"v6e-{n}": f"v6e:{s}" for n, s in ((16, "4x4"), (32, "4x8"), (64, "8x8"), (128, "8x16"), (256, "16x16"))},
}
# generation prefix of the topology name -> (chip_config_name, chips_per_host_bounds). v4/v5p: one device per chip
# (megacore); v5e/v6e: 4 chips per host VM in the multi-host slices.
_CHIP_CONFIG = {"v4": ("megacore", (2, 2, 1)), "v5": ("megacore", (2, 2, 1)), "v5e": ("default", (2, 2, 1)),
                "v6e": ("default", (2, 2, 1))}


def topology_devices(name: str, num_slices: int = 1) -> list:
    """Compile-only TPU devices of a named topology ('v5e-256', 'v5p-128', or 'v5e:16x16'); needs libtpu."""
    topo = TOPOLOGIES.get(name, name)
    gen = topo.split(":")[0]
    if ":" not in topo or gen not in _CHIP_CONFIG:
        raise UserError(f"unknown TPU topology {name!r}; known: {', '.join(TOPOLOGIES)} or '<v4|v5|v5e|v6e>:AxB[xC]'")
    chip_config, host_bounds = _CHIP_CONFIG[gen]
    from jax.experimental import topologies
    try:
        desc = topologies.get_topology_desc(topo, "tpu", chip_config_name=chip_config,
                                            chips_per_host_bounds=host_bounds, num_slices=num_slices)
    except (RuntimeError, NotImplementedError, ValueError) as e:
        raise UserError(f"mesh.compile_topology={name!r} needs libtpu on this host for ahead-of-time TPU compilation "
                        f"(pip install 'jax[tpu]' matching jax {jax.__version__}); jaxlib said: {e}") from None
    return list(desc.devices)


def target_mesh(config, devices=None) -> tuple[jax.sharding.Mesh, str]:
    """(mesh, description) for config.mesh on its target: `devices` (default: this host's), or
    `mesh.compile_topology`.

    With mesh.num_slices > 1 the 'data' axis runs across slices (DCN) and 'fsdp'/'tensor' inside each slice (ICI).
    """
    cfg = config_lib.resolve(config)
    topo, slices = cfg.mesh.compile_topology, cfg.mesh.num_slices
    devices = topology_devices(topo, slices) if topo else (devices or jax.devices())
    config_lib.validate(cfg, len(devices))
    shape = sharding.resolve_mesh_shape(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, len(devices))
    if shape[0] % slices:
        raise UserError(f"mesh.data={shape[0]} must be a multiple of mesh.num_slices={slices} (data parallelism is "
                        f"the only axis that goes across slices)")
    if slices > 1 and hasattr(devices[0], "slice_index"):      # TPU slices: ICI inside, DCN across
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_hybrid_device_mesh((shape[0] // slices,) + shape[1:], (slices, 1, 1), devices)
        mesh = jax.sharding.Mesh(grid, sharding.MESH_AXES)
    else:                                                       # 'data' is the outermost (slowest) mesh axis
        mesh = sharding.make_mesh(cfg.mesh, devices)
    kind = getattr(devices[0], "device_kind", devices[0].platform)
    where = f"topology {topo} x{slices} slice(s)" if topo else "this host"
    return mesh, f"{len(devices)} {kind} device(s) on {where}"


def abstract_batch(config, model_cfg, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs of one global batch of the run's method (methods.Method.batch_structure), rows sharded over
    ('data', 'fsdp') like make_global_batch."""
    cfg = config_lib.resolve(config)
    rows = cfg.data.global_batch_size
    structure = methods.for_config(cfg).batch_structure(cfg, model_cfg)
    return {k: jax.ShapeDtypeStruct((rows,) + shape, dtype, sharding=sharding.batch_sharding(mesh, 1 + len(shape)))
            for k, (shape, dtype) in structure.items()}


@dataclasses.dataclass
class CompileResult:
    compiled: object
    mesh: jax.sharding.Mesh
    where: str
    model_cfg: object
    analytic_flops_per_step: float
    model_type: str = "oneflow"


def compile_train_step(config, devices=None) -> CompileResult:
    """Lowers and compiles the real train step for the configured mesh: the run's method's model, objective and step,
    jitted as the train loop jits them (train_state.jit_train_step)."""
    from oneflow_jax.training.train_state import abstract_train_state, build_model, jit_train_step, make_optimizer
    cfg = config_lib.resolve(config)
    mesh, where = target_mesh(cfg, devices)
    try:
        model, _ = build_model(cfg, config_lib.vocab_size(cfg))
    except ValueError as e:
        raise UserError(str(e)) from None
    tx, schedule = make_optimizer(cfg.optimizer, cfg.total_steps)
    state, state_shardings = abstract_train_state(model, tx, mesh, cfg.optimizer.ema_decay)
    batch = abstract_batch(cfg, model.cfg, mesh)
    step = jit_train_step(model, tx, schedule, cfg, state_shardings)
    # The executable never runs: on CPU skip LLVM's optimisations (about 2x faster compile). Buffer assignment, and
    # so the memory numbers, happen before the backend and come out identical.
    options = {"xla_backend_optimization_level": 0} if mesh.devices.flat[0].platform == "cpu" else None
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        compiled = step.lower(state, batch).compile(compiler_options=options)
    return CompileResult(compiled, mesh, where, model.cfg,
                         flops.train_flops_per_step(model.cfg, cfg.data, cfg.model_type), cfg.model_type)


def memory_stats(compiled) -> dict[str, int]:
    """Per-device bytes from the compiled executable; `total` = arguments + outputs - aliased (donated) + temps +
    code, the footprint XLA plans for one step."""
    mem = compiled.memory_analysis()
    stats = {k: int(getattr(mem, f"{k}_size_in_bytes", 0) or 0)
             for k in ("argument", "output", "alias", "temp", "generated_code")}
    stats["total"] = stats["argument"] + stats["output"] - stats["alias"] + stats["temp"] + stats["generated_code"]
    return stats


def xla_flops(compiled) -> float | None:
    """XLA's cost_analysis()['flops'] of the compiled program (per device for a sharded program), if reported."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def memory_lines(result: CompileResult) -> list[str]:
    stats = memory_stats(result.compiled)
    lines = [f"compiled train step ({result.model_type}): mesh {dict(result.mesh.shape)} on {result.where}"]
    lines += [f"{k:>15}: {v / 2**30:8.3f} GiB per device" for k, v in stats.items()]
    n = math.prod(result.mesh.shape.values())
    lines.append(f"{'analytic flops':>15}: {result.analytic_flops_per_step / n:.4g} per device per step "
                 f"({result.analytic_flops_per_step:.4g} per step, oneflow_jax.training.flops)")
    return lines
