"""Options shared by several commands."""
from __future__ import annotations

import os
from pathlib import Path

import click

from edgebuild.build.config import PROFILES


def model_option(f):
    return click.option("--model", "model", default=lambda: os.environ.get("EDGEBUILD_MODEL", "smollm2-135m"),
                        show_default="smollm2-135m",
                        help="HF model dir, .safetensors or .gguf file, hub id, an embedded model "
                             "name (smollm2-135m) or tiny-random.")(f)


def target_option(f):
    return click.option("--target", default="local", show_default=True,
                        help="Target name (see `edgebuild targets list`) or a target .toml file.")(f)


def config_option(f):
    return click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                        help="TOML build config (stages, knobs, gate thresholds).")(f)


def profile_option(f):
    return click.option("--profile", type=click.Choice(PROFILES), default=None,
                        help="Benchmark size: smoke (a few items), quick (50 per task), reduced (200 per task), full.")(f)


def data_dir_option(f):
    return click.option("--data-dir", type=click.Path(path_type=Path), default=lambda: os.environ.get("EDGEBUILD_DATA_DIR"),
                        help="Directory with the benchmark data (env EDGEBUILD_DATA_DIR).")(f)


def out_option(f):
    return click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("out"),
                        show_default=True, help="Output directory (artifacts, cache, manifest, reports).")(f)


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")(f)


def build_options(f):
    for deco in reversed([model_option, target_option, config_option, profile_option, data_dir_option,
                          out_option, json_option]):
        f = deco(f)
    return f


def unsandboxed_option(f):
    return click.option("--allow-unsandboxed-code", "allow_unsandboxed", is_flag=True,
                        help="Run generated code (HumanEval, MBPP) without isolation when no code "
                             "sandbox (bubblewrap) works here; without it such benchmarks are "
                             "unavailable (config: build.allow_unsandboxed_code).")(f)


def _remember(ctx, param, value):
    """Keep a compute option for ``compute_settings`` (the build commands' signatures stay as they are)."""
    ctx.meta[f"edgebuild.{param.name}"] = value
    return value


def compute_options(f):
    """``--device``, ``--executor`` and ``--ray-address``: where the host's work runs."""
    from edgebuild.core.accel import CHOICES
    from edgebuild.core.executors import executors
    f = click.option("--ray-address", "ray_address", default=None, expose_value=False, callback=_remember,
                     help="Ray cluster of --executor ray (host:port or ray://host:port; default: "
                          "$RAY_ADDRESS, else a Ray instance started on this machine).")(f)
    f = click.option("--executor", "executor", type=click.Choice(executors.names()), default=None,
                     expose_value=False, callback=_remember,
                     help="Where independent work (compression of a stage's next search trials, benchmark "
                          "shards of a stage, builds of several targets) runs: local, or ray "
                          "(pip install 'edgebuild[ray]'); results are the same (config: build.executor).")(f)
    return click.option("--device", "torch_device", type=click.Choice(CHOICES), default=None,
                        expose_value=False, callback=_remember,
                        help="Where torch compresses and scores on the host: auto (cuda when a GPU is "
                             "present), cpu or cuda (config: build.torch_device).")(f)


def compute_settings() -> dict:
    """The compute options of the running command (None: not given), as config overrides."""
    ctx = click.get_current_context(silent=True)
    meta = ctx.meta if ctx is not None else {}
    return {key: meta.get(f"edgebuild.{key}") for key in ("torch_device", "executor", "ray_address")}
