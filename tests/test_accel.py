"""The accelerator: which torch device a build uses, named in its manifest; CUDA runs behind the
``gpu`` marker (skipped by default)."""
import pytest

from edgebuild.core.accel import TorchDevice, describe, resolve
from edgebuild.core.errors import ConfigError, ExitCode, HostError


def test_auto_picks_cuda_only_when_torch_sees_one():
    assert resolve("auto", available=lambda: True) == "cuda"
    assert resolve("auto", available=lambda: False) == "cpu"
    assert resolve("cpu", available=lambda: True) == "cpu"
    assert resolve("cuda", available=lambda: True) == "cuda"


def test_cuda_asked_for_but_absent_is_a_one_line_host_error():
    with pytest.raises(HostError) as err:
        resolve("cuda", available=lambda: False)
    assert err.value.exit_code == ExitCode.HOST and "--device cpu" in err.value.one_line()
    assert "\n" not in err.value.one_line()
    with pytest.raises(HostError):               # checked at once, before any work
        TorchDevice("cuda", available=lambda: False)
    with pytest.raises(ConfigError):
        resolve("tpu", available=lambda: True)


def test_auto_is_resolved_only_when_needed():
    asked = []
    device = TorchDevice("auto", available=lambda: asked.append(1) or False)
    assert device.resolved is None and not asked
    assert str(device) == "cpu" and device.resolved == "cpu" and asked == [1]
    assert describe("cpu") == "cpu"


def test_device_cuda_on_a_machine_without_one(tmp_path, capsys, monkeypatch):
    import torch
    from edgebuild.build.cli import main
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main(["compress", "--model", "tiny-random", "--device", "cuda", "--out", str(tmp_path / "out"),
                 "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == ExitCode.HOST and len(err) == 1 and "--device cuda" in err[0], err


@pytest.mark.gpu
def test_host_scores_on_cuda_equal_the_cpu_ones(tmp_path):
    """The stage model on CUDA (float32) scores the same items as on the CPU, to the same answers."""
    import torch
    from conftest import DATA_DIR, tiny_llama
    from edgebuild.bench.step import score_task
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model, tok = tiny_llama()
    cpu = score_task(model, tok, "piqa", "smoke", DATA_DIR, tmp_path / "cache", 0)
    gpu = score_task(model.to("cuda"), tok, "piqa", "smoke", DATA_DIR, tmp_path / "cache", 0)
    assert [i for i, _ in gpu["items"]] == [i for i, _ in cpu["items"]]
    assert gpu["score"] == cpu["score"]


@pytest.mark.gpu
def test_rtn_compression_on_cuda_matches_the_cpu(tmp_path):
    import numpy as np
    import torch
    from conftest import tiny_llama
    from edgebuild.compress.base import CompressContext
    from edgebuild.compress.packing import pack_model
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model, tok = tiny_llama()
    out = {}
    for device in ("cpu", "cuda"):
        ctx = CompressContext(model=model.to(device), tokenizer=tok, calibration_texts=[], device=device, seed=0)
        out[device] = pack_model(model, "rtn", {"bits": 4}, ctx)
    for a, b in zip(out["cpu"], out["cuda"]):
        assert a.name == b.name and all(np.array_equal(a.arrays[k], b.arrays[k]) for k in a.arrays)
