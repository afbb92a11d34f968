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
