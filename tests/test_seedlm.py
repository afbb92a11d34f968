"""SeedLM: the LFSR, the seed search, the bit-packed records and the numpy decoder."""
import dataclasses

import numpy as np
import pytest
import torch

from edgebuild.core.errors import ConfigError, ModelError
from edgebuild.compress import _seedlm_pruned as pruned
from edgebuild.compress import _seedlm_search as search
from edgebuild.compress.base import CompressContext
from edgebuild.compress.seedlm import SeedLM, SeedLMConfig, exponent_window
from edgebuild.device_agent import packed
from edgebuild.device_agent.codecs import decode
from edgebuild.device_agent.codecs import seedlm as codec


def _method(**knobs):
    knobs.setdefault("kernel", "eager")
    return SeedLM(SeedLMConfig(**knobs))


def _fibonacci_reference(seed, count, bits, poly_exponents):
    """Bit-by-bit LFSR written from the polynomial: a[n+K] = XOR of a[n+j] over its lower terms."""
    a = [(seed >> i) & 1 for i in range(bits)]
    states = []
    for n in range(count):
        a.append(sum(a[n + j] for j in poly_exponents) % 2)
        states.append(sum(bit << i for i, bit in enumerate(a[n + 1:n + 1 + bits])))
    return states


def _planted(seeds, block_size, latent_dim, bits, n, seed=0):
    """Blocks exactly representable by the given seeds: (blocks, exponents, mantissas)."""
    rng = np.random.default_rng(seed)
    mants = rng.integers(-7, 8, size=(n, latent_dim))
    mants[:, 0] = rng.choice([-7, -6, -5, 5, 6, 7], size=n)   # max |m| in 5..7: the rule picks e
    exps = rng.integers(-9, -6, size=n)
    basis = codec.bases(seeds, block_size, latent_dim, bits)
    return codec.reconstruct(basis, exps, mants), exps, mants


# --- LFSR -----------------------------------------------------------------------------------------

def test_lfsr_golden_matrix_k3_seed4():
    states = codec.lfsr_states([4], 8, 3).reshape(4, 2)
    assert states.tolist() == [[2, 5], [6, 7], [3, 1], [4, 2]]
    basis = codec.bases([4], 4, 2, 3)[0]
    np.testing.assert_array_equal(basis, ((states - 4) / np.float32(3)).astype(np.float32))


@pytest.mark.parametrize("bits", sorted(codec.PRIMITIVE_TAPS))
def test_every_polynomial_has_the_full_period(bits):
    states = np.arange(1, 1 << bits)
    following = codec.lfsr_step(states, bits)
    assert sorted(following.tolist()) == states.tolist()        # a permutation of the nonzero states
    nxt, state, period = following.tolist(), 1, 0
    while True:
        state, period = nxt[state - 1], period + 1
        if state == 1:
            break
    assert period == (1 << bits) - 1


@pytest.mark.parametrize("bits,poly", [(3, (0, 1)), (16, (0, 1, 3, 12))])
def test_generator_follows_the_feedback_polynomial(bits, poly):
    """K=3: x^3 + x + 1 (the golden example); K=16: x^16 + x^12 + x^3 + x + 1, same convention."""
    for seed in (1, 4, 0xACE1 % (1 << bits) or 1, (1 << bits) - 1):
        got = codec.lfsr_states([seed], 40, bits)[0].tolist()
        assert got == _fibonacci_reference(seed, 40, bits, poly)


def test_bases_are_normalised_to_plus_minus_one():
    basis = codec.bases(np.arange(1, 1 << 16), 8, 3, 16)
    assert basis.dtype == np.float32 and basis.shape == (65535, 8, 3)
    assert basis.min() >= -1.0 - 1e-7 and basis.max() == 1.0


# --- search ---------------------------------------------------------------------------------------

def _brute_force_errors(blocks, seeds, block_size, latent_dim, bits, lo, hi):
    """Float64 squared error after quantisation of every (block, seed), written the plain way."""
    w = blocks.astype(np.float64)
    errs = np.empty((len(w), len(seeds)))
    for i, basis in enumerate(codec.bases(seeds, block_size, latent_dim, bits).astype(np.float64)):
        t = w @ np.linalg.pinv(basis).T
        e = np.clip(np.floor(np.log2(np.abs(t).max(1) / 7.5)) + 1, lo, hi)
        m = np.clip(np.round(t / 2.0 ** e[:, None]), -8, 7)
        errs[:, i] = ((w - (m * 2.0 ** e[:, None]) @ basis.T) ** 2).sum(1)
    return errs


@pytest.mark.parametrize("shape", [(8, 3), (12, 4), (6, 2)])
def test_search_finds_the_lowest_error_after_quantisation(shape):
    block_size, latent_dim = shape
    seeds = np.arange(1, 256)
    blocks = np.random.default_rng(1).normal(0, 0.05, size=(40, block_size)).astype(np.float32)
    bank = search.make_bank(seeds, block_size, latent_dim, 8, seed_chunk=64)
    found = search.Searcher(bank, "eager", block_chunk=16).search(torch.from_numpy(blocks), -20, -4)
    errs = _brute_force_errors(blocks, seeds, block_size, latent_dim, 8, -20, -4)
    chosen = errs[np.arange(40), found.index.numpy()]
    np.testing.assert_allclose(chosen, errs.min(1), rtol=1e-9, atol=1e-15)
    recon = search.reconstruct(bank.basis[found.index], found.exponent, found.mantissa)
    np.testing.assert_allclose(((torch.from_numpy(blocks) - recon) ** 2).sum(1).double(), chosen,
                               rtol=1e-4)


def test_full_search_recovers_planted_seeds_small_k():
    seeds = np.array([3, 77, 200, 77, 255])
    blocks, exps, mants = _planted(seeds, 8, 3, 8, len(seeds))
    bank = search.make_bank(np.arange(1, 256), 8, 3, 8, seed_chunk=32)
    found = search.Searcher(bank, "eager", block_chunk=4).search(torch.from_numpy(blocks), -15, 0)
    assert bank.seeds[found.index.numpy()].tolist() == seeds.tolist()
    assert found.exponent.tolist() == exps.tolist()
    assert found.mantissa.tolist() == mants.tolist()


def test_method_recovers_planted_seeds_within_its_k16_budget():
    method = _method(seed_budget=700)
    candidates = method.candidate_seeds("cpu", rng_seed=5)
    assert len(candidates) == 700 and len(set(candidates.tolist())) == 700
    planted = np.random.default_rng(2).choice(candidates, size=24)
    blocks, _, _ = _planted(planted, 8, 3, 16, len(planted))
    weight = torch.from_numpy(blocks.reshape(6, 32))
    ctx = CompressContext(seed=5)
    (record,) = method.compress({"w": weight}, ctx)
    seeds, _, _ = codec.unpack_fields(record.arrays["packed"], 24, 16, 3)
    assert seeds.tolist() == planted.tolist()
    np.testing.assert_array_equal(decode(record), blocks.reshape(6, 32))     # exact: zero error
    assert ctx.log["seedlm"]["relative_error"] == 0.0


def test_tile_kernel_without_matmul_agrees():
    """The elementwise projection (compiled and CUDA kernels) picks what the matmul one picks."""
    rows = torch.randn(64, 8) * 0.05
    bank = search.make_bank(np.arange(1, 513), 8, 3, 16, seed_chunk=128)
    lo, hi = torch.tensor(-20 + 126, dtype=torch.int32), torch.tensor(-3 + 126, dtype=torch.int32)
    tile = (bank.proj, bank.tri, bank.solve)
    low, col = search.tile_best(rows, *tile, lo, hi, matmul=False)
    per_group = [search.tile_best(rows, *(x[g:g + 1] for x in tile), lo, hi, matmul=True)
                 for g in range(4)]
    lows = torch.stack([g_low for g_low, _ in per_group])
    cols = torch.stack([g_col + 128 * g for g, (_, g_col) in enumerate(per_group)])
    best, group = lows.min(0)
    torch.testing.assert_close(low, best, rtol=1e-5, atol=1e-10)
    assert (col == cols.gather(0, group[None])[0]).float().mean() > 0.95


def test_ill_conditioned_bases_are_scored_accurately():
    """Near-singular bases need huge coefficients; the score must still match the true error."""
    seeds = np.arange(1, 1 << 16)
    blocks = np.random.default_rng(3).normal(0, 0.05, size=(64, 8)).astype(np.float32)
    bank = search.make_bank(seeds, 8, 3, 16, seed_chunk=4096)
    found = search.Searcher(bank, "eager", block_chunk=64).search(torch.from_numpy(blocks), -40, 20)
    recon = search.reconstruct(bank.basis[found.index], found.exponent, found.mantissa)
    w = torch.from_numpy(blocks)
    true_err = ((w - recon).double() ** 2).sum(1)
    claimed = found.score.double() + (w.double() ** 2).sum(1)
    torch.testing.assert_close(claimed, true_err, rtol=1e-3, atol=1e-7)


# --- the pruned search (every seed, exact) ----------------------------------------------------------

_ALL_SEEDS = np.arange(1, 1 << 16)


@pytest.fixture(scope="module")
def full_bank():
    bank = search.make_bank(_ALL_SEEDS, 8, 3, 16, seed_chunk=128)
    return bank, pruned.make_tables(bank)


def _bits(exp_lo, exp_hi):
    return (torch.tensor(exp_lo + 126, dtype=torch.int32), torch.tensor(exp_hi + 126, dtype=torch.int32))


def _random_blocks(n, size, seed):
    """Gaussian blocks of scales over four decades, a zero block, a tiny block and a constant one."""
    rng = np.random.default_rng(seed)
    blocks = rng.normal(0, 1, size=(n, size)) * 10.0 ** rng.uniform(-3, 0, size=(n, 1))
    blocks[1], blocks[2], blocks[3] = 0.0, blocks[2] * 1e-7, 0.02
    return torch.from_numpy(blocks.astype(np.float32))


def _assert_same_as_exhaustive(blocks, bank, tables, exp_lo, exp_hi):
    lo, hi = _bits(exp_lo, exp_hi)
    want = pruned.exhaustive_best(blocks, tables, lo, hi)
    got = pruned.best_seeds(blocks, tables, lo, hi)
    assert torch.equal(got, want), (got != want).nonzero()[:5]
    found = search.Searcher(bank, "pruned").search(blocks, exp_lo, exp_hi)
    assert torch.equal(found.index, want)
    return found


def test_pruned_search_picks_what_scoring_every_seed_picks(full_bank):
    bank, tables = full_bank
    blocks = _random_blocks(40, 8, 5)
    _assert_same_as_exhaustive(blocks, bank, tables, *exponent_window(blocks))


def test_pruned_search_is_never_worse_than_the_eager_exhaustive_kernel(full_bank):
    """Both pick over all 65,535 seeds; the pruned pick has the lowest score under the common scorer."""
    bank, _ = full_bank
    blocks = torch.from_numpy(np.random.default_rng(6).normal(0, 0.05, size=(64, 8)).astype(np.float32))
    got = search.Searcher(bank, "pruned").search(blocks, -20, -3)
    eager = search.Searcher(bank, "eager", 64).search(blocks, -20, -3)
    assert bool((got.score <= eager.score).all())
    assert (got.index == eager.index).float().mean() >= 0.95
    torch.testing.assert_close(got.score, eager.score, rtol=1e-5, atol=1e-9)


def test_least_squares_bound_holds_for_every_seed(full_bank):
    """Every seed's score is at least the bound the search prunes with, ill-conditioned bases included."""
    _, tables = full_bank
    blocks = _random_blocks(12, 8, 7)
    lo, hi = _bits(*exponent_window(blocks))
    i, j = tables.pairs
    n = (blocks[:, i] * blocks[:, j]) @ tables.quad[:, :tables.n_seeds]
    wn = (blocks * blocks).sum(1, keepdim=True)
    bound = -(1 + pruned.REL_MARGIN) * (n + tables.margin * wn) - pruned.ABS_MARGIN
    scores = pruned.score_seeds(blocks, torch.arange(tables.n_seeds).expand(12, -1), tables, lo, hi)
    assert bool((scores >= bound).all())
    assert float((scores - bound).min()) < 1e-3 * float(wn.max())    # and it is tight


@pytest.mark.parametrize("shape,bits", [((12, 4), 16), ((6, 2), 16), ((8, 3), 8), ((4, 1), 8)])
def test_pruned_search_is_exact_for_other_shapes(shape, bits):
    size, latent = shape
    seeds = np.sort(np.random.default_rng(8).choice(np.arange(1, 1 << bits), 250, replace=False))
    bank = search.make_bank(seeds, size, latent, bits, seed_chunk=64)
    blocks = _random_blocks(48, size, 9)
    _assert_same_as_exhaustive(blocks, bank, pruned.make_tables(bank), *exponent_window(blocks))


def test_pruned_search_recovers_planted_seeds_and_ignores_threads(full_bank):
    bank, tables = full_bank
    planted = np.array([1, 4097, 30000, 65535, 1234, 30000])
    blocks, exps, mants = _planted(planted, 8, 3, 16, len(planted))
    found = search.Searcher(bank, "pruned").search(torch.from_numpy(blocks), -15, 0)
    assert bank.seeds[found.index.numpy()].tolist() == planted.tolist()
    assert found.exponent.tolist() == exps.tolist() and found.mantissa.tolist() == mants.tolist()
    lo, hi = _bits(-20, -3)
    rows = _random_blocks(600, 8, 10)
    assert torch.equal(pruned.best_seeds(rows, tables, lo, hi, threads=1),
                       pruned.best_seeds(rows, tables, lo, hi, threads=2))


def test_all_seeds_budget_on_cpu_uses_the_pruned_kernel():
    method = SeedLM(SeedLMConfig(seed_budget="all"))
    assert len(method.candidate_seeds("cpu")) == 65535 and method.config.budget == 65535
    weight = torch.randn(4, 32) * 0.02
    ctx = CompressContext()
    (record,) = SeedLM(SeedLMConfig(seed_budget=512)).compress({"w": weight}, ctx)
    assert ctx.log["seedlm"]["kernel"] == "pruned" and ctx.log["seedlm"]["seeds_searched"] == 512
    np.testing.assert_array_equal(decode(record).shape, (4, 32))


@pytest.mark.slow
def test_pruned_search_is_exact_on_smollm2_rows(full_bank):
    """Rows of every projection type of SmolLM2-135M (``make model``), each tensor's exponent window."""
    from safetensors import safe_open

    from edgebuild.core import models

    bank, tables = full_bank
    ref = models.resolve("smollm2-135m")
    rng = np.random.default_rng(11)
    with safe_open(f"{ref.path}/model.safetensors", "pt") as weights:
        for name in [k for k in weights.keys() if k.endswith("proj.weight")][::29]:
            blocks = weights.get_tensor(name).float().reshape(-1, 8)
            window = exponent_window(blocks)
            rows = blocks[torch.from_numpy(rng.choice(blocks.shape[0], 48, replace=False))]
            found = _assert_same_as_exhaustive(rows, bank, tables, *window)
            eager = search.Searcher(bank, "eager", 64).search(rows, *window)
            assert bool((found.score <= eager.score).all()), name


# --- records, packing, decoder --------------------------------------------------------------------

def test_pack_fields_round_trip():
    rng = np.random.default_rng(4)
    seeds, codes = rng.integers(1, 1 << 16, 37), rng.integers(0, 16, 37)
    mants = rng.integers(-8, 8, size=(37, 4))
    stream = codec.pack_fields(seeds, codes, mants, 16)
    assert stream.dtype == np.uint8 and stream.size == -(-37 * 36 // 8)
    got = codec.unpack_fields(stream, 37, 16, 4)
    assert [g.tolist() for g in got] == [seeds.tolist(), codes.tolist(), mants.tolist()]


@pytest.mark.parametrize("block_size,latent_dim,rate", [(8, 3, 4.0), (12, 4, 3.0)])
def test_packed_bits_per_weight(block_size, latent_dim, rate):
    weight = torch.randn(24, 48) * 0.02
    (record,) = _method(block_size=block_size, latent_dim=latent_dim, seed_budget=64).compress(
        {"w": weight}, CompressContext())
    assert list(record.arrays) == ["packed"]
    assert 8 * record.nbytes / weight.numel() == rate
    assert record.params["num_blocks"] * (16 + 4 + 4 * latent_dim) == 8 * record.nbytes


@pytest.mark.parametrize("knobs", [{}, {"block_size": 12, "latent_dim": 4}, {"lfsr_bits": 8}])
def test_decoder_equals_method_reconstruction_exactly(knobs, tmp_path):
    weight = torch.randn(13, 29) * 0.03            # 377 weights: the last block is padded
    weight[5] *= 30
    method = _method(seed_budget=300, **knobs)
    record, recon = method.compress_tensor("w", weight, method.searcher(method.candidate_seeds()))
    assert recon.dtype == torch.float32 and recon.shape == weight.shape
    np.testing.assert_array_equal(decode(record), recon.numpy())
    packed.write(tmp_path / "w.bin", [record])
    _, (back,) = packed.read(tmp_path / "w.bin")
    np.testing.assert_array_equal(decode(back), recon.numpy())


def test_nothing_to_compress_gives_no_records():
    ctx = CompressContext()
    assert _method().compress({}, ctx) == [] and "seedlm" not in ctx.log


def test_compress_logs_budget_and_reports_progress():
    calls = []
    ctx = CompressContext(progress=lambda done, total: calls.append((done, total)))
    weights = {"a": torch.randn(8, 64) * 0.02, "b": torch.randn(16, 40) * 0.02}
    records = _method(seed_budget=128).compress(weights, ctx)
    assert [r.name for r in records] == ["a", "b"] and all(r.codec == "seedlm" for r in records)
    info = ctx.log["seedlm"]
    assert info["seeds_searched"] == 128 and info["of"] == 65535 and info["device"] == "cpu"
    assert info["kernel"] == "eager" and info["block_seed_pairs"] == (64 + 80) * 128
    assert info["bits_per_weight"] == 4.0 and 0.0 < info["relative_error"] < 0.6
    assert calls[-1] == (2, 2)                             # tensors, advanced by blocks searched
    assert [c[1] for c in calls] == [2] * len(calls)
    assert [c[0] for c in calls] == sorted(c[0] for c in calls)


def test_larger_budget_lowers_the_error():
    weight = torch.randn(32, 64) * 0.02
    errors = []
    for budget in (16, 256, 4096):
        ctx = CompressContext()
        _method(seed_budget=budget).compress({"w": weight}, ctx)
        errors.append(ctx.log["seedlm"]["relative_error"])
    assert errors[0] > errors[1] > errors[2]


def test_exponent_window_covers_the_largest_block_and_clamps_tiny_ones():
    weight = torch.full((3, 16), 1e-9)
    weight[0, :8] = torch.linspace(-1.0, 1.0, 8)
    weight[2, 8:] = 0.0
    exp_min, exp_max = exponent_window(weight.reshape(-1, 8))
    assert exp_max == -1 and exp_min == -16               # ||block|| = 1.85 < 7.5 * 2**-2
    record, recon = _method(seed_budget=64).compress_tensor(
        "w", weight, search.Searcher(search.make_bank(np.arange(1, 65), 8, 3, 16, 64), "eager"))
    _, codes, _ = codec.unpack_fields(record.arrays["packed"], 6, 16, 3)
    assert codes.tolist()[1:] == [0] * 5                   # tiny and zero blocks sit at exp_min
    np.testing.assert_array_equal(decode(record), recon.numpy())
    assert np.all(decode(record)[2, 8:] == 0.0)


def test_decoder_rejects_inconsistent_records():
    record = _method(seed_budget=16).compress({"w": torch.randn(4, 16)}, CompressContext())[0]
    params = dict(record.params)
    del params["exp_min"]
    with pytest.raises(codec.SeedLMFormatError, match="exp_min"):
        codec.decode(params, record.arrays, record.shape)
    with pytest.raises(codec.SeedLMFormatError, match="bits"):
        codec.decode(record.params, {"packed": record.arrays["packed"][:-1]}, record.shape)
    with pytest.raises(codec.SeedLMFormatError, match="cannot hold"):
        codec.decode(record.params, record.arrays, (5, 16))
    with pytest.raises(codec.SeedLMFormatError, match="taps"):
        codec.decode({**record.params, "taps": [16, 3]}, record.arrays, record.shape)
    with pytest.raises(codec.SeedLMFormatError, match="coefficients"):
        codec.decode({**record.params, "coef_bits": 3}, record.arrays, record.shape)


# --- knobs ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("knob,value", [
    ("lfsr_bits", 17), ("lfsr_bits", 1), ("lfsr_bits", 16.0), ("block_size", 1), ("block_size", 65),
    ("latent_dim", 0), ("latent_dim", 8), ("latent_dim", 10), ("seed_budget", 0), ("seed_budget", True),
    ("seed_budget", "every"),
    ("full_search_on_gpu", "yes"), ("kernel", "fast"),
])
def test_bad_knobs_raise_config_error(knob, value):
    knobs = {"block_size": 16, knob: value} if (knob, value) == ("latent_dim", 10) else {knob: value}
    with pytest.raises(ConfigError, match=rf"'{knob}'.*allowed"):
        SeedLM.from_knobs(knobs)


def test_non_matrix_or_non_finite_weights_are_model_errors():
    with pytest.raises(ModelError, match="2-D"):
        _method().compress({"bias": torch.zeros(8)}, CompressContext())
    bad = torch.zeros(4, 8)
    bad[1, 1] = float("nan")
    with pytest.raises(ModelError, match="NaN"):
        _method().compress({"w": bad}, CompressContext())


def test_full_search_on_gpu_ignores_the_budget():
    method = _method(seed_budget=10)
    assert len(method.candidate_seeds("cuda")) == 65535
    assert len(method.candidate_seeds("cpu")) == 10
    no_full = SeedLM(dataclasses.replace(method.config, full_search_on_gpu=False))
    assert len(no_full.candidate_seeds("cuda")) == 10


# --- kernels --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_compiled_kernel_matches_eager():
    """torch.compile of the fused tile (C++ on CPU) picks the same seeds as the eager kernel."""
    blocks = torch.randn(300, 8) * 0.05
    bank = search.make_bank(np.arange(1, 2049), 8, 3, 16, seed_chunk=512)
    eager = search.Searcher(bank, "eager", 128).search(blocks, -20, -3)
    fused = search.Searcher(bank, "compiled", 128)
    got = fused.search(blocks, -20, -3)
    assert fused.kernel == "compiled"
    assert (got.index == eager.index).float().mean() > 0.99
    torch.testing.assert_close(got.score, eager.score, rtol=1e-5, atol=1e-9)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_search_matches_cpu_and_decodes_exactly():
    weight = torch.randn(64, 96) * 0.02
    knobs = {"seed_budget": 2048, "full_search_on_gpu": False}
    cpu_ctx, gpu_ctx = CompressContext(), CompressContext(device="cuda")
    (cpu,) = _method(**knobs).compress({"w": weight}, cpu_ctx)
    (gpu,) = SeedLM(SeedLMConfig(**knobs)).compress({"w": weight}, gpu_ctx)
    assert gpu_ctx.log["seedlm"]["device"] == "cuda"
    assert abs(gpu_ctx.log["seedlm"]["relative_error"] - cpu_ctx.log["seedlm"]["relative_error"]) < 1e-3
    method = SeedLM(SeedLMConfig(**knobs))
    record, recon = method.compress_tensor("w", weight.cuda(), method.searcher(
        method.candidate_seeds("cuda"), "cuda"))
    np.testing.assert_array_equal(decode(record), recon.numpy())


_FUSED_CHECK = """
import numpy as np, torch
from edgebuild.compress import _seedlm_search as search, _seedlm_triton as fused
for C, P in [(8, 3), (12, 4), (6, 2), (4, 1)]:
    bank = search.make_bank(np.arange(1, 300), C, P, 16, 64)
    rows = torch.randn(77, C, generator=torch.Generator().manual_seed(C)) * 0.05
    lo, hi = torch.tensor(106, dtype=torch.int32), torch.tensor(121, dtype=torch.int32)
    _, col = search.tile_best(rows, bank.proj, bank.tri, bank.solve, lo, hi)
    got = fused.best_seeds(rows, fused.FusedTerms(bank, 64), 106, 121)
    want = search.finish(rows, col, bank, lo, hi).score
    have = search.finish(rows, got, bank, lo, hi).score
    assert torch.equal(have, want), (C, P, (have - want).abs().max())
    print(C, P, float((got == col).float().mean()))
"""


def test_fused_triton_kernel_matches_the_tile_kernel_in_the_interpreter():
    """The Triton kernel, run by Triton's CPU interpreter, picks seeds scoring exactly as the tile's."""
    pytest.importorskip("triton", reason="Triton is installed with CUDA builds of torch")
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", _FUSED_CHECK], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(out.stdout.split("\n")) >= 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_kernel_on_cuda_is_the_fused_one_and_matches_eager():
    blocks = torch.randn(5000, 8) * 0.05
    seeds = np.arange(1, 4097)
    cpu = search.Searcher(search.make_bank(seeds, 8, 3, 16, 512), "eager", 1024).search(blocks, -20, -3)
    gpu_search = search.Searcher(search.make_bank(seeds, 8, 3, 16, 1024, "cuda"), "auto")
    got = gpu_search.search(blocks, -20, -3)
    assert gpu_search.kernel == "fused"
    assert (got.index.cpu() == cpu.index).float().mean() > 0.99
    torch.testing.assert_close(got.score.cpu(), cpu.score, rtol=1e-4, atol=1e-7)


def test_knob_walk_trades_size_then_budget():
    from edgebuild.compress.search import knob_walk

    start = {"block_size": 12, "latent_dim": 4, "seed_budget": 4096}
    walk = [SeedLMConfig(**k) for k in knob_walk(start, SeedLM.knob_space, SeedLM.knob_order)]
    assert [(c.block_size, c.latent_dim, c.seed_budget) for c in walk] == \
        [(8, 3, 4096), (8, 4, 4096), (8, 4, 16384), (8, 4, 65535)]
    bits = [SeedLMConfig(**start).bits_per_weight] + [c.bits_per_weight for c in walk]
    assert bits == sorted(bits) and bits[:3] == [3.0, 4.0, 4.5]
