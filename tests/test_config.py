"""Build config loading and validation: one schema, one-line errors, generated reference docs."""
import dataclasses
from pathlib import Path

import pytest

from edgebuild.build import config_schema
from edgebuild.build.config import BuildConfig, GateConfig, StageConfig, load_config, reference
from edgebuild.core import schema
from edgebuild.core.errors import ConfigError, ExitCode

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    p = tmp_path / "build.toml"
    p.write_text(text)
    return p


def test_defaults_validate():
    cfg = load_config(None)
    assert cfg.stages == ["baseline", "seedlm", "vptq", "hyper"]
    assert cfg.gates.core["vptq"] == 0.95 and cfg.gates.expert["hyper"] == 0.88
    assert cfg.gates.cumulative == 0.84 and cfg.allow_unsandboxed_code is False
    assert cfg.stage_config("hyper").scope == "leftovers" and cfg.stage_config("rtn").method == "rtn"
    assert cfg.tasks is None and cfg.device is True and cfg.max_trials == 4   # the whole suite gates


def test_overrides_from_toml(tmp_path):
    cfg = load_config(write(tmp_path, """
[build]
stages = ["baseline", "seedlm"]
profile = "smoke"
allow_unsandboxed_code = true
[stage.seedlm]
method = "rtn"
knobs = {bits = 8, group_size = 64}
[gates]
core = {seedlm = 0.9}
"""))
    assert cfg.stages == ["baseline", "seedlm"] and cfg.profile == "smoke"
    assert cfg.stage_config("seedlm").knobs == {"bits": 8, "group_size": 64}
    assert cfg.gates.core == {"seedlm": 0.9, "vptq": 0.95, "hyper": 0.90}
    assert cfg.allow_unsandboxed_code is True


def test_the_demo_config_and_a_custom_stage_load(tmp_path):
    demo = load_config(REPO / "configs" / "demo.toml")
    assert demo.tasks is None and demo.profile == "quick" and demo.device_profile == "smoke"
    assert demo.stage_config("vptq").source == "previous" and demo.max_trials == 2
    cfg = load_config(write(tmp_path, '[build]\nstages = ["baseline", "rtn4"]\n'
                                      '[stage.rtn4]\nmethod = "rtn"\nknobs = {bits = 4}\n'
                                      '[gates]\ncore = {rtn4 = 0.9}\n'))
    assert cfg.stage_config("rtn4").method == "rtn" and cfg.gates.core["rtn4"] == 0.9


def test_cli_overrides_are_validated_too():
    assert load_config(None, profile="smoke", stages=["baseline"]).stages == ["baseline"]
    with pytest.raises(ConfigError, match="key 'build.stages' must start with 'baseline'"):
        load_config(None, stages=["seedlm"])
    with pytest.raises(ConfigError, match="key 'build.allow_unsandboxed_code' must be true or false"):
        load_config(None, allow_unsandboxed_code="yes")


def test_a_ladder_override_keeps_the_files_stage_tables(tmp_path):
    """`edgebuild bench` runs the baseline only; the file's [stage.vptq] is still fine."""
    path = write(tmp_path, '[build]\nstages = ["baseline", "vptq"]\n[stage.vptq]\nsource = "baseline"\n')
    cfg = load_config(path, stages=["baseline"])
    assert cfg.stages == ["baseline"] and "vptq" in cfg.stage


@pytest.mark.parametrize("text, message", [
    ("[build]\nprofle = 'smoke'\n",
     "unknown key 'build.profle'; did you mean 'build.profile'? (allowed in [build]: stages, profile,"),
    ("[build]\nprofile = 'huge'\n",
     "key 'build.profile' must be one of 'smoke', 'quick', 'reduced', 'full', got 'huge'"),
    ("[build]\nstages = ['seedlm']\n", "key 'build.stages' must start with 'baseline', got ['seedlm']"),
    ("[build]\nstages = ['baseline', 'vptq', 'vptq']\n",
     "key 'build.stages' must name each stage once (vptq repeated)"),
    ("[build]\nstages = ['baseline', 'seedln']\n",
     "key 'build.stages[1]' must name a stage (hyper, rtn, seedlm, vptq) or have a [stage.seedln] "
     "table naming its method, got 'seedln'; did you mean 'seedlm'?"),
    ("[build]\nstages = ['baseline', 3]\n", "key 'build.stages[1]' must be a string, got 3"),
    ("[build]\ntasks = 'arc_easy'\n", "key 'build.tasks' must be a list of benchmark names: arc_challenge, "),
    ("[build]\ntasks = ['arc_easyy']\n", "key 'build.tasks[0]' must name a benchmark (arc_challenge, "),
    ("[build]\ntasks = ['arc_easyy']\n", "got 'arc_easyy'; did you mean 'arc_easy'?"),
    ("[build]\ntasks = ['arc_easy', 'piqa']\ndevice_tasks = ['boolq']\n",
     "key 'build.device_tasks[0]' must name a benchmark of build.tasks (arc_easy, piqa), got 'boolq'"),
    ("[build]\ntasks = ['arc_easy']\nedge_task = 'boolq'\n", "key 'build.edge_task' must name a benchmark of build.tasks"),
    ("[build]\nmax_trials = 0\n", "key 'build.max_trials' must be an integer > 0, got 0"),
    ("[build]\ntime_budget_s = -5\n", "key 'build.time_budget_s' must be"),
    ("[gates]\ndevice_agreement = 0\n", "key 'gates.device_agreement' must be a number in (0, 1], got 0"),
    ("[gates]\ndevice_agreement = 1.5\n", "key 'gates.device_agreement' must be a number in (0, 1], got 1.5"),
    ("[stage.vptq]\nspace = {}\n", "the knob space of 'vptq' is empty"),
    ("[stage.vptq]\nspace = { outlier_fraction = [] }\n", "knob 'outlier_fraction' needs a non-empty list"),
    ("[stage.rtn]\nmethod = 'rtn'\nspace = { bitz = [4] }\n[build]\nstages = ['baseline', 'rtn']\n", "'rtn' has no knob 'bitz'"),
    ("[stage.vptq]\nfallback_layers = [0]\n", "key 'stage.vptq.fallback_layers[0]' must be an integer > 0"),
    ("[build]\nexperts = []\n", "key 'build.experts' must name at least one expert domain"),
    ("[build]\nseed = -3\n", "key 'build.seed' must be an integer >= 0, got -3"),
    ("[build]\ncalibration_texts = 2.5\n", "key 'build.calibration_texts' must be an integer >= 0"),
    ("[build]\neudaimonia = 'yes'\n", "key 'build.eudaimonia' must be true or false, got 'yes'"),
    ("[build]\nexporter = 'onxx'\n", "key 'build.exporter' must name an exporter (onnx), got 'onxx'"),
    ("[build]\ngates = 3\n", "unknown key 'build.gates' (allowed in [build]:"),
    ("[bulid]\nx = 1\n", "unknown key 'bulid'; did you mean 'build'? (allowed in the top level: build, stage, gates)"),
    ("stage = 3\n", "key 'stage' must be a table, got 3"),
    ("[stage]\nseedlm = 3\n", "key 'stage.seedlm' must be a table ([stage.seedlm]), got 3"),
    ("[stage.seedlm]\nmetod = 'rtn'\n",
     "unknown key 'stage.seedlm.metod'; did you mean 'stage.seedlm.method'? (allowed in [stage.seedlm]:"),
    ("[stage.seedlm]\nmethod = 'rnt'\n",
     "key 'stage.seedlm.method' must name a compression method (hyper, rtn, seedlm, vptq), got 'rnt'; "
     "did you mean 'rtn'?"),
    ("[stage.seedlm]\nsource = 'prev'\n",
     "key 'stage.seedlm.source' must be one of 'previous', 'baseline', got 'prev'"),
    ("[stage.seedlm]\nknobs = {bits = 99}\n", "key 'stage.seedlm.knobs': unknown knob(s) ['bits']"),
    ("[stage.seedlm]\nknobs = {bitz = 4}\n", "key 'stage.seedlm.knobs': unknown knob(s) ['bitz']"),
    ("[stage.seedlm]\nmethod = 'rtn'\nknobs = {bits = 99}\n", "key 'stage.seedlm.knobs': rtn knob 'bits'"),
    ("[stage.seedln]\nmethod = 'rtn'\n",
     "key 'stage.seedln' must name a stage of build.stages (baseline, hyper, seedlm, vptq), got "
     "'seedln'; did you mean 'seedlm'?"),
    ("[stage.baseline]\nmethod = 'rtn'\n", "key 'stage.baseline': the baseline stage takes no settings"),
    ("[gates]\ncumulative = 'high'\n", "key 'gates.cumulative' must be a number in (0, 1], got 'high'"),
    ("[gates]\ncumulative = 1.5\n", "key 'gates.cumulative' must be a number in (0, 1], got 1.5"),
    ("[gates]\ncore = {seedlm = 0}\n", "key 'gates.core.seedlm' must be a number in (0, 1], got 0"),
    ("[gates]\ncore = {seedln = 0.9}\n",
     "key 'gates.core.seedln' must name a compressed stage (hyper, rtn, seedlm, vptq), got 'seedln'; "
     "did you mean 'seedlm'?"),
    ("[gates]\nkl_max = {hyper = 0}\n", "key 'gates.kl_max.hyper' must be a number > 0, got 0"),
    ("[gates]\neudaimonia = {vptq = 1.2}\n", "key 'gates.eudaimonia.vptq' must be a number in [0, 1]"),
    ("[gates]\nmax_retries = 1\n", "unknown key 'gates.max_retries'"),
    ("[gates]\nconfidence = 1\n", "key 'gates.confidence' must be a number in (0, 1), got 1"),
    ("[gates]\nbootstrap = 0\n", "key 'gates.bootstrap' must be an integer > 0, got 0"),
    ("[gates]\nretention = 'log'\n",
     "key 'gates.retention' must be one of 'raw', 'chance_normalised', got 'log'"),
    ("[gates]\ndevice_budgets = 'no'\n", "key 'gates.device_budgets' must be true or false"),
    ("not toml at all [", "not valid TOML"),
    ("[build]\nseed = 1\nseed = 2\n", "not valid TOML"),
])
def test_errors_name_file_key_value_and_what_is_allowed(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    line = err.value.one_line()
    assert line.startswith(f"{path}: ") and message in line, line
    assert "\n" not in line and err.value.exit_code == ExitCode.CONFIG


def test_several_problems_are_counted_on_the_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"\(2 more problems in this file\)$"):
        load_config(write(tmp_path, "[gates]\ncumulative = 2\nconfidence = 2\nbootstrap = 0\n"))


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "bin.toml")


def test_the_classes_keep_their_python_interface():
    sc = StageConfig("vptq", {"bits": 2}, "baseline", False, "weights")   # positional, as the pipeline builds it
    assert (sc.method, sc.source) == ("vptq", "baseline")
    assert StageConfig(method="raw").method == "raw"      # the baseline's pseudo-method
    gates = GateConfig(on_inconclusive="pass", cumulative=0.9)
    assert gates.core["hyper"] == 0.90 and dataclasses.asdict(gates)["cumulative"] == 0.9
    cfg = BuildConfig()
    cfg.max_trials = 2
    cfg.tasks = ["boolq"]
    assert cfg.validate() is cfg
    cfg.max_trials = 0
    with pytest.raises(ConfigError, match="<defaults>: key 'build.max_trials' must be an integer > 0"):
        cfg.validate()


def test_adding_a_key_is_one_line_with_its_description():
    """Every key has a description, and the rendered docs name it."""
    text = reference()
    for cls in (config_schema.BuildConfig, config_schema.StageConfig, config_schema.GateConfig):
        for name, info in schema.fields(cls).items():
            assert info.description, f"{cls.__name__}.{name} has no description"
            if name not in ("stage", "gates", "source_file"):
                assert f"`{name}`" in text


def test_checked_in_docs_are_generated_from_the_schema():
    path = REPO / "docs" / "config.md"
    assert path.read_text() == reference(), "docs/config.md is stale: run `make docs`"
