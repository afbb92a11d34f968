"""``edgebuild measure``: the tool measured against a reference, side by side in one run.

These are the ``make bench-*`` targets. Each prints a table and, with ``--json FILE``, writes its
rows to FILE after every row, so a run stopped early keeps what it measured.
"""
from __future__ import annotations

from pathlib import Path

import click

from edgebuild.build.cli.options import data_dir_option, model_option, out_option, target_option
from edgebuild.build.config import PROFILES


def json_out_option(f):
    return click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
                        help="Also write the rows to this file (rewritten after every row).")(f)


def _saver(json_out):
    from edgebuild.core.files import write_json_atomic

    def save(rows: list) -> None:
        if json_out is not None:
            write_json_atomic(json_out, rows)
    return save


def _data_dir(data_dir) -> Path:
    from edgebuild.core.data import check_data_dir
    check_data_dir(data_dir)
    return Path(data_dir)


@click.group("measure")
def measure_group():
    """Measure edgebuild against a reference, side by side in one run (the make bench-* targets)."""


@measure_group.command("compress")
@model_option
@data_dir_option
@click.option("--configs", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="JSON file of [label, method, knobs, note] rows (default: each method next to rtn).")
@json_out_option
def compress_cmd(model, data_dir, configs, json_out):
    """Every compression method next to rtn at matching bits/weight: packed bytes, bits/weight,
    KL and top-1 agreement against the uncompressed model, perplexity ratio, wall time."""
    from edgebuild.build.measure import compress_methods
    rows_in = compress_methods.CONFIGS if configs is None else _json_rows(configs)
    rows = compress_methods.run(model, _data_dir(data_dir), rows_in, on_row=_saver(json_out))
    compress_methods.print_table(rows, model)


def _json_rows(path: Path) -> list:
    import json
    from edgebuild.core.errors import ConfigError
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a JSON list of [label, method, knobs, note] rows: {e}") from None
    if not isinstance(rows, list) or not all(isinstance(r, list) and len(r) == 4 for r in rows):
        raise ConfigError(f"{path}: expected a JSON list of [label, method, knobs, note] rows")
    return rows


@measure_group.command("host")
@model_option
@data_dir_option
@click.option("--profile", type=click.Choice(PROFILES), default="reduced", show_default=True)
@click.option("--tasks", default="arc_easy,piqa,hellaswag", show_default=True, help="Comma-separated benchmarks.")
@click.option("--device", default="cpu", show_default=True, help="torch device for both sides (e.g. cuda).")
@click.option("--dtype", type=click.Choice(("float32", "bfloat16", "float16")), default="float32",
              show_default=True, help="Weight dtype for both sides.")
@click.option("--num-fewshot", type=click.IntRange(min=0), default=None,
              help="Few-shot examples for every task on both sides (default: each benchmark's own).")
@json_out_option
def host_cmd(model, data_dir, profile, tasks, device, dtype, num_fewshot, json_out):
    """edgebuild's host scoring next to lm-eval's own hf model: same model object, items and
    few-shot examples; scores, per-item agreement and items/s of each."""
    from edgebuild.bench import compare
    from edgebuild.build.cli.build_cmds import _tasks_option
    names = _tasks_option(tasks)
    rows = compare.compare(model, _data_dir(data_dir), names, profile, device=device, dtype=dtype,
                           num_fewshot=num_fewshot, on_row=_saver(json_out))
    shots = "" if num_fewshot is None else f", {num_fewshot}-shot"
    compare.print_table(rows, f"host benchmarks on {model} ({device}, {dtype}{shots}), profile "
                              f"{profile}: edgebuild vs lm_eval --model hf")


@measure_group.command("suite")
@model_option
@data_dir_option
@click.option("--profile", type=click.Choice(PROFILES), default="quick", show_default=True)
@click.option("--tasks", default="arc_easy,piqa,hellaswag,gsm8k", show_default=True,
              help="Comma-separated benchmarks (not the code benchmarks).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Batch size of both sides.")
@click.option("--num-fewshot", type=click.IntRange(min=0), default=None,
              help="Few-shot examples for every task on both sides (default: each benchmark's own).")
@json_out_option
def suite_cmd(model, data_dir, profile, tasks, batch_size, num_fewshot, json_out):
    """edgebuild's host scorer next to the lm_eval command run as its own process on the same
    items and few-shot examples: items/s of each and the two scores side by side (CPU, fp32)."""
    from edgebuild.build.cli.build_cmds import _tasks_option
    from edgebuild.build.measure import suite_speed
    setup = suite_speed.Setup(model, _data_dir(data_dir), profile, batch_size=batch_size,
                              num_fewshot=num_fewshot)
    rows = suite_speed.run(setup, _tasks_option(tasks), on_row=_saver(json_out))
    shots = "" if num_fewshot is None else f", {num_fewshot}-shot"
    suite_speed.print_table(rows, f"host benchmarks on {model} (cpu, float32{shots}), profile {profile}: "
                                  "edgebuild vs the lm_eval command")


@measure_group.command("device")
@out_option
@target_option
@json_out_option
def device_cmd(out, target, json_out):
    """Prefill and decode speed of each stage of a finished build, in the device agent and in
    torch on the same machine."""
    from edgebuild.build.measure import device_speed
    rows = device_speed.run(Path(out) / target, target)
    _saver(json_out)(rows)
    device_speed.print_table(rows, f"stage artifacts in the agent ({target}) and in torch, same machine, fp32")


@measure_group.command("runtime")
@model_option
@data_dir_option
@click.option("--build-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="A finished build (OUT/TARGET): also measure its compressed stages.")
@target_option
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=Path("out/bench-runtime"),
              show_default=True, help="Where the runtime directories and GGUF files are kept (reused).")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--prompt-len", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--decode-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--llama/--no-llama", default=True, show_default=True,
              help="Also measure llama.cpp on the model's GGUF (needs the bench extra).")
@json_out_option
def runtime_cmd(model, data_dir, build_dir, target, work, threads, prompt_len, decode_tokens, repeats,
                llama, json_out):
    """Each runtime encoding of the model in the device agent (fp32, int8, int4 at each block size),
    the compressed stages of a build, and llama.cpp on the same model: bytes on disk, resident
    memory, prefill and decode tokens/s, KL against the fp32 baseline, and the ratios to the fp32
    baseline and to llama.cpp Q4_1; one fresh process per row, same threads and prompt."""
    from edgebuild.build.measure import runtime_speed
    from edgebuild.export.encodings import plan_from_spec
    from edgebuild.targets import load_target

    timing = runtime_speed.Timing(threads=threads, prompt_len=prompt_len, decode_tokens=decode_tokens,
                                  repeats=repeats)
    result = runtime_speed.run(model, _data_dir(data_dir), work, build_dir=build_dir,
                               stage_plan=plan_from_spec(load_target(target).runtime), timing=timing,
                               llama=llama, on_row=_saver(json_out))
    _saver(json_out)(result)
    runtime_speed.print_table(result)


def register(group) -> None:
    group.add_command(measure_group)
