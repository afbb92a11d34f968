"""Build commands: all, compress, export, bench, deploy, gate."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click

from edgebuild.build.cli.options import build_options, compute_options, compute_settings, unsandboxed_option
from edgebuild.build.cli.output import chatter_to_stderr, progress
from edgebuild.build.steps import COMMANDS
from edgebuild.core.errors import ExitCode


def _request(model, target, config_path, profile, data_dir, out, *, force=False, from_stage=None,
             steps=None, stages=None, allow_unsandboxed=False, check_tasks=True, search=None):
    from edgebuild.bench import sandbox
    from edgebuild.build.config import load_config
    from edgebuild.build.pipeline import STEPS, BuildRequest
    cfg = load_config(config_path, profile=profile, stages=stages,
                      allow_unsandboxed_code=True if allow_unsandboxed else None, **(search or {}),
                      **compute_settings())
    sandbox.allow_unsandboxed(cfg.allow_unsandboxed_code)
    steps = steps or STEPS
    if check_tasks and "host" in steps and cfg.tasks is not None:   # the default suite drops what cannot run
        _require_code_sandbox(cfg.tasks)
    check_out_dir(out)
    return BuildRequest(model=model, target=target, config=cfg, out=out, data_dir=data_dir, force=force,
                        from_stage=from_stage, steps=steps, progress=progress())


def check_out_dir(out: Path) -> None:
    """``--out`` is (or can be made) a writable directory; else a one-line ``UsageError``."""
    from edgebuild.core.errors import UsageError
    hint = "pass --out a directory you can write to"
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out, prefix=".edgebuild-write-check-"):
            pass
    except FileExistsError:
        raise UsageError(f"--out {out} is not a directory", hint=hint) from None
    except OSError as e:
        raise UsageError(f"cannot write to --out {out}: {e.strerror or e}", hint=hint) from None


def _require_code_sandbox(tasks) -> None:
    """Benchmarks that run generated code need a code sandbox or the explicit opt-in."""
    from edgebuild.bench import benchmarks, sandbox
    from edgebuild.bench.codeexec import runs_code
    from edgebuild.core.errors import ConfigError
    code = [t for t in tasks if t in benchmarks and runs_code(benchmarks.get(t))]
    reason = sandbox.unavailable_reason() if code else None
    if reason:
        raise ConfigError(f"{', '.join(code)} cannot run: {reason}")


def output_lock(req, no_wait: bool):
    """The lock of the build's ``--out`` (one writer per output directory), held for a ``with``
    block: a second build waits for it and says so, or with ``--no-wait`` stops at once (exit 14)."""
    from edgebuild.core.lock import OutputLock
    ctx = click.get_current_context(silent=True)
    what = f"{ctx.command_path if ctx else 'edgebuild'} --target {req.target}"
    return OutputLock(req.out, what).hold(wait=not no_wait, on_wait=lambda msg: click.echo(msg, err=True))


def _run(req, as_json: bool, *, manifest: bool = True, junit=None, wandb_mode=None, no_wait=False):
    from edgebuild.build import summary
    with output_lock(req, no_wait), chatter_to_stderr():
        result, path = build_one(req, junit, wandb_mode, manifest)
    if as_json:
        click.echo(json.dumps(summary.as_dict(result, path), indent=2, default=str))
    else:
        summary.print_table(result, path)
    return result


def build_one(req, junit=None, wandb_mode=None, manifest: bool = True):
    """``(result, manifest path)`` of one target's build, its records written (``manifest``).
    The caller holds the output lock; an executor may run this elsewhere (one target each)."""
    from edgebuild.build.pipeline import Pipeline
    pipeline = Pipeline(req)
    tracker = _tracker(req, pipeline.out_dir, wandb_mode) if manifest else None
    try:
        result = pipeline.run()
        return result, (_record(result, junit, tracker) if manifest else None)
    finally:
        if tracker is not None:
            tracker.abort()          # still open only when the build stopped with an error


def _run_targets(reqs: list, as_json: bool, junit, wandb_mode, no_wait) -> int:
    """Builds of several targets, each a call on the build's executor (Ray: a task each; their
    benchmark shards then run inside it); records per target as one build of it would write.
    Exit code: the first non-zero one, in --target order."""
    from edgebuild.build import summary
    from edgebuild.core.executors import make
    cfg = reqs[0].config
    executor = make(cfg.executor, cfg.ray_address)
    try:
        calls = [(_portable(req, executor), _per_target(junit, req.target), wandb_mode) for req in reqs]
        with output_lock(reqs[0], no_wait), chatter_to_stderr(), \
                reqs[0].progress.step(f"build {len(reqs)} targets", total=len(reqs), unit="targets") as update:
            built = executor.map(build_one, calls, progress=update)
    finally:
        executor.close()
    for result, path in built:
        if not as_json:
            summary.print_table(result, path)
    if as_json:
        click.echo(json.dumps({"targets": {req.target: summary.as_dict(r, p) for req, (r, p) in zip(reqs, built)}},
                              indent=2, default=str))
    return next((int(r.exit_code) for r, _ in built if int(r.exit_code)), 0)


def _portable(req, executor):
    """``req`` as a call elsewhere gets it: no progress display (it has no terminal), benchmark
    shards run where the target's build runs."""
    import copy
    import dataclasses
    from edgebuild.core.progress import Progress
    if executor.local:
        return req
    config = copy.copy(req.config)
    config.executor, config.ray_address = "local", ""
    return dataclasses.replace(req, config=config, progress=Progress("quiet"))


def _per_target(junit, target: str):
    """The JUnit path of one target's build: ``NAME.TARGET.xml`` beside the one asked for."""
    return None if junit is None else junit.with_name(f"{junit.stem}.{target}{junit.suffix}")


def _tracker(req, build_dir: Path, wandb_mode):
    """The W&B run of the build, started now and told of each stage as it finishes (None: disabled)."""
    from edgebuild.build.tracking import WandbTracker, resolve_mode
    from edgebuild.core.data import check_data_dir
    if resolve_mode(wandb_mode) == "disabled":
        return None
    check_data_dir(req.data_dir)            # a build that cannot start gets no run
    tracker = WandbTracker(build_dir, mode=wandb_mode)
    cfg = req.config
    if tracker.start({"model": req.model, "target": build_dir.name, "profile": cfg.profile, "tasks": cfg.tasks,
                      "ladder": cfg.stages, "experts": cfg.experts, "seed": cfg.seed}):
        req.listeners.append(tracker)
    return tracker


def _record(result, junit, tracker=None):
    """Manifest, report.md, report.html, the W&B run's tables and plots (closing it) and JUnit XML
    (when asked) of a build."""
    from edgebuild.build.manifest import write_manifest
    from edgebuild.build.report import write_reports
    from edgebuild.build.report_html import write_html_report
    path = write_manifest(result)
    write_reports(result, path)
    write_html_report(result.out_dir)
    if tracker is not None:
        tracker.finish(path)
    if junit is not None:
        from edgebuild.core.errors import UsageError
        from edgebuild.build.junit import write_junit
        try:
            write_junit(json.loads(path.read_text()), junit)
        except OSError as e:
            raise UsageError(f"cannot write the JUnit file {junit}: {e.strerror or e}",
                             hint=f"pass a writable --junit path; the build's records are in {path.parent}") from None
    return path


def search_options(f):
    f = click.option("--no-device", "no_device", is_flag=True,
                     help="Build without the device: its checks are reported as skipped, and no stage "
                          "is validated on the target.")(f)
    f = click.option("--max-trials", type=int, default=None,
                     help="Attempts per stage at most (the search over the method's settings; "
                          "default: build.max_trials, 4).")(f)
    return click.option("--time-budget", "time_budget", type=float, default=None,
                        help="Seconds after which no stage starts another attempt (default: none).")(f)


def _search(no_device, max_trials, time_budget) -> dict:
    return {"device": False if no_device else None, "max_trials": max_trials, "time_budget_s": time_budget}


def no_wait_option(f):
    return click.option("--no-wait", "no_wait", is_flag=True,
                        help="When another build holds --out, stop at once (exit 14) instead of "
                             "waiting for it.")(f)


def record_options(f):
    f = click.option("--junit", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="Also write JUnit XML here: one test case per gate check.")(f)
    return click.option("--wandb", "wandb_mode", type=click.Choice(("offline", "online", "disabled")),
                        default=None, help="Weights & Biases logging (default: $WANDB_MODE, else offline, "
                                           "into <out>/<target>/wandb; `wandb sync` it later).")(f)


@click.command("all")
@build_options
@compute_options
@record_options
@search_options
@unsandboxed_option
@no_wait_option
@click.option("--force", is_flag=True, help="Redo every step, ignoring the cache.")
@click.option("--from", "from_stage", default=None, help="Redo this stage and the ones after it.")
def all_cmd(model, target, config_path, profile, data_dir, out, as_json, junit, wandb_mode, no_device,
            max_trials, time_budget, allow_unsandboxed, no_wait, force, from_stage):
    """Run the whole build: baseline, each compression stage (searching its settings), export,
    host and device benchmarks, gates; write the manifest and reports; exit with a code CI can
    act on. Several targets (--target a,b): one build each, on the executor (--executor ray: in
    parallel), each writing <out>/<target>/ as its own build would."""
    reqs = [_request(model, name, config_path, profile, data_dir, out, force=force, from_stage=from_stage,
                     allow_unsandboxed=allow_unsandboxed, search=_search(no_device, max_trials, time_budget))
            for name in _targets(target)]
    if len(reqs) > 1:
        return _run_targets(reqs, as_json, junit, wandb_mode, no_wait)
    return int(_run(reqs[0], as_json, junit=junit, wandb_mode=wandb_mode, no_wait=no_wait).exit_code)


def _targets(value: str) -> list:
    """The targets of ``--target`` (comma-separated), each once."""
    names = list(dict.fromkeys(t.strip() for t in value.split(",") if t.strip()))
    if not names:
        from edgebuild.core.errors import UsageError
        raise UsageError("--target names no target", hint="pass a target name, or several separated by commas")
    return names


def _partial(name: str, steps: tuple, doc: str):
    @click.command(name, help=doc)
    @build_options
    @compute_options
    @no_wait_option
    @click.option("--force", is_flag=True, help="Redo the steps, ignoring the cache.")
    def cmd(model, target, config_path, profile, data_dir, out, as_json, no_wait, force):
        req = _request(model, target, config_path, profile, data_dir, out, force=force, steps=steps)
        _run(req, as_json, manifest=False, no_wait=no_wait)
        return 0
    return cmd


compress_cmd = _partial("compress", COMMANDS["compress"], "Compress every configured stage and write its packed weights "
                        "(bytes and bits/weight are printed); no benchmarks.")
export_cmd = _partial("export", COMMANDS["export"], "Compress and export every stage: its runtime directory "
                      "(the target's runtime encodings) and the ONNX graph + packed weights, each checked "
                      "against torch logits.")
deploy_cmd = _partial("deploy", COMMANDS["deploy"], "Compress and encode each stage and push its runtime "
                      "directory to the target's device agent, measuring it there in a fresh process "
                      "(latency, memory, weights sha256); no gates.")


@click.command("bench")
@build_options
@compute_options
@unsandboxed_option
@no_wait_option
@click.option("--tasks", default=None, help="Comma-separated benchmarks, or 'all' (every registered "
                                            "benchmark); default: the core suite and the expert "
                                            "benchmarks of build.experts.")
def bench_cmd(model, target, config_path, profile, data_dir, out, as_json, allow_unsandboxed, no_wait, tasks):
    """Benchmark the model as it is (no compression) on the host and print each benchmark's score,
    n, bootstrap interval and chance level. Without --tasks: the core suite and the expert
    benchmarks of the config's expert domains; benchmarks that cannot run are listed as unavailable."""
    from edgebuild.build.pipeline import Pipeline
    from edgebuild.build import summary
    req = _request(model, target, config_path, profile, data_dir, out, steps=COMMANDS["bench"],
                   stages=["baseline"], allow_unsandboxed=allow_unsandboxed, check_tasks=False)
    suite = _suite(tasks, req)
    _require_code_sandbox(suite.tasks)
    req.config.tasks = suite.tasks
    with output_lock(req, no_wait), chatter_to_stderr():
        result = Pipeline(req).run()
    if as_json:
        rows = summary.benchmark_rows(result, req.config.gates.confidence)
        click.echo(json.dumps({**summary.as_dict(result), "benchmarks": rows,
                               "unavailable": suite.unavailable}, indent=2, default=str))
    else:
        summary.print_benchmarks(result, req.config.gates.confidence, suite.unavailable)
    return 0


def _tasks_option(value: str) -> list:
    """The benchmarks named in ``--tasks`` (comma-separated), each checked against the registry."""
    from edgebuild.bench import benchmarks
    names = [t.strip() for t in value.split(",") if t.strip()]
    for name in names:
        benchmarks.get(name)             # unknown names: ConfigError with a did-you-mean
    return names


def _suite(value, req):
    """The benchmarks ``edgebuild bench`` runs: the named ones, or the planned suite."""
    from edgebuild.bench.suite import Suite, plan
    from edgebuild.core.errors import DataError
    from edgebuild.core.data import check_data_dir
    if value is not None and value.strip() != "all":
        return Suite(_tasks_option(value))
    check_data_dir(req.data_dir)
    suite = plan(req.config.experts, req.data_dir, every=value is not None)
    if not suite.tasks:
        raise DataError(f"no benchmark can run with the data in {req.data_dir}",
                        hint="point --data-dir at the benchmark data folder described in its SOURCES.md")
    return suite


@click.command("gate")
@build_options
@compute_options
@record_options
@search_options
@no_wait_option
@click.option("--stage", default=None, help="Stage whose verdict sets the exit code (default: the last).")
def gate_cmd(model, target, config_path, profile, data_dir, out, as_json, junit, wandb_mode, no_device,
             max_trials, time_budget, no_wait, stage):
    """Evaluate the gates of every stage (reusing cached results) and print each check.
    Exits 12 when the chosen stage failed."""
    req = _request(model, target, config_path, profile, data_dir, out,
                   search=_search(no_device, max_trials, time_budget))
    result = _run(req, as_json, junit=junit, wandb_mode=wandb_mode, no_wait=no_wait)
    name = stage or req.config.stages[-1]
    runs = [r for r in result.runs if r.stage == name]
    if not runs:
        from edgebuild.core.errors import UsageError
        raise UsageError(f"stage {name!r} is not part of this build ({', '.join(req.config.stages)})")
    return 0 if runs[-1].status == "passed" else int(ExitCode.GATE_FAILED)


def register(group) -> None:
    for cmd in (all_cmd, compress_cmd, export_cmd, bench_cmd, deploy_cmd, gate_cmd):
        group.add_command(cmd)
