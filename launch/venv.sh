#!/usr/bin/env bash
# Sourced by tests/run.sh and launch/local.sh: create or reuse ./.venv and install oneflow_jax with its extras.
# torch is installed first, pinned, so the `torch` extra never pulls a multi-GB CUDA build.
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
source .venv/bin/activate
stamp=.venv/.installed-$(cat setup.py | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  python -m pip install -q --upgrade pip setuptools wheel
  python -m pip install -q "torch==2.13.0"
  python -m pip install -q -e ".[torch,test]"
  touch "$stamp"
fi
export PYTHONUNBUFFERED=1
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
