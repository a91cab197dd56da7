#!/usr/bin/env bash
# Sourced by tests/run.sh and launch/local.sh: create or reuse ./.venv and install oneflow_jax with the extras named in
# $OFJ_EXTRAS (default "torch,test", what the tests need; launch/local.sh asks for none).
# Installs go through uv when it can be installed (measured on a 2-core machine with cold caches: ~2 min for the
# torch+test set, where pip took 5-9 min), else through pip. torch is pinned to 2.13.0 (a CPU wheel) so the `torch`
# extra never pulls a multi-GB CUDA build; $PIP_FIND_LINKS is passed on to uv, which does not read pip's config.
# --compile-bytecode: uv writes no .pyc by default, and the tests import torch/TF/JAX in dozens of subprocesses.
extras="${OFJ_EXTRAS-torch,test}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
source .venv/bin/activate
stamp=.venv/.installed-$( (cat setup.py; echo "extras=$extras") | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  target="."
  [ -n "$extras" ] && target=".[$extras]"
  pins=()
  [[ ",$extras," == *",torch,"* ]] && pins=("torch==2.13.0")
  echo "installing oneflow_jax${extras:+[$extras]} into .venv (first run only)" >&2
  if python -m pip install -q uv >/dev/null 2>&1; then
    python -m uv pip install -q --compile-bytecode ${PIP_FIND_LINKS:+--find-links "$PIP_FIND_LINKS"} "${pins[@]}" -e "$target"
  else
    python -m pip install -q --upgrade pip setuptools wheel
    if [ ${#pins[@]} -gt 0 ]; then python -m pip install -q "${pins[@]}"; fi
    python -m pip install -q -e "$target"
  fi
  touch "$stamp"
fi
export PYTHONUNBUFFERED=1
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
