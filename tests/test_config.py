"""Build config loading and validation."""
import pytest

from edgebuild.build.config import load_config
from edgebuild.core.errors import ConfigError


def write(tmp_path, text):
    p = tmp_path / "build.toml"
    p.write_text(text)
    return p


def test_defaults_validate():
    cfg = load_config(None)
    assert cfg.stages == ["baseline", "seedlm", "vptq", "hyper"]
    assert cfg.gates.core["vptq"] == 0.95 and cfg.gates.expert["hyper"] == 0.88
    assert cfg.gates.cumulative == 0.84


def test_overrides_from_toml(tmp_path):
    cfg = load_config(write(tmp_path, """
[build]
stages = ["baseline", "seedlm"]
profile = "smoke"
[stage.seedlm]
method = "rtn"
knobs = {bits = 8, group_size = 64}
[gates]
core = {seedlm = 0.9}
"""))
    assert cfg.stages == ["baseline", "seedlm"] and cfg.profile == "smoke"
    assert cfg.stage_config("seedlm").knobs == {"bits": 8, "group_size": 64}
    assert cfg.gates.core == {"seedlm": 0.9, "vptq": 0.95, "hyper": 0.90}


@pytest.mark.parametrize("text, words", [
    ("[build]\nprofle = 'smoke'\n", ["build.profle", "did you mean", "profile"]),
    ("[build]\nprofile = 'huge'\n", ["build.profile", "smoke, reduced, full"]),
    ("[build]\nstages = ['seedlm']\n", ["build.stages", "baseline"]),
    ("[stage.seedlm]\nmethod = 'rnt'\n", ["stage.seedlm.method", "did you mean 'rtn'"]),
    ("[stage.seedlm]\nknobs = {bits = 99}\n", ["stage.seedlm.knobs", "bits"]),
    ("[stage.seedlm]\nknobs = {bitz = 4}\n", ["stage.seedlm.knobs", "bitz"]),
    ("[gates]\ncumulative = 'high'\n", ["gates.cumulative"]),
    ("[gates]\nretention = 'log'\n", ["gates.retention", "chance_normalised"]),
    ("not toml at all [", ["not valid TOML"]),
])
def test_errors_name_file_key_and_allowed_values(tmp_path, text, words):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg
    for w in words:
        assert w in msg


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
