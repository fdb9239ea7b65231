"""The GPU sampler: temperature, the top-k / top-p cut and the draw in one pass over the bf16 logits.

sampling.sample (the slow twin, any device) upcasts the whole [batch, vocab] block to float32, divides by the
temperature, takes a softmax, draws Exp(1) noise of the same size and divides: six passes over a 150 MB block for
256 rows of a 152k vocabulary. The same draw needs one read of the logits. The exponential race says
argmax_j p_j / E_j with E_j ~ Exp(1) is one draw from p; its logarithm, argmax_j (l_j / T - log E_j), needs
neither the softmax (its normaliser is the same for every j) nor any float32 copy. The kernel reads each logit
once, makes its noise from a counter-based generator (Philox: the noise of column j depends only on the row's
seed and j, so a seeded row gets the same token whatever else is in the batch), and keeps a running argmax.

Top-k / top-p become one number per row: a logit threshold (sampling.filter_thresholds; tokens below it are out),
computed only for the rows that ask for a cut. Greedy rows (inverse temperature 0) take the plain argmax.

The noise is not torch's: torch's CUDA generator lays its stream out by launch configuration, so a seeded request
draws other tokens here than through sampling.sample on the same seed (same distribution, same contract).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from .sampling import GREEDY_BELOW, SamplingParams, filter_thresholds

# Columns per loop iteration: 4 x QUARTER, QUARTER = min(MAX_QUARTER, the vocabulary / 4 rounded up to a power
# of two). One Philox call gives four 32-bit words, one per quarter of a block: column j's noise is word
# (j % BLOCK) // QUARTER of counter (j // BLOCK) * QUARTER + j % QUARTER under the row's seed. So it depends on
# the vocabulary size and this constant, never on the launch: changing it changes every seeded request's tokens.
MAX_QUARTER = 256


def block_quarter(vocab: int) -> int:
    """QUARTER for a vocabulary: a model's takes MAX_QUARTER; a test's tiny one no wider than it needs."""
    return min(MAX_QUARTER, triton.next_power_of_2(triton.cdiv(vocab, 4)))


@triton.jit
def _exp1_log(bits):
    """log(E) for E = -log(U) ~ Exp(1), U uniform from 32 random bits, accurate where E is small (U near 1),
    which is where the winners come from: there E ~ 1 - U, and 1 - U is formed from the integer, not rounded."""
    u = (bits.to(tl.float32) + 0.5) * 2.3283064365386963e-10  # (k + 0.5) / 2^32, in (0, 1)
    w = ((4294967295 - bits).to(tl.float32) + 0.5) * 2.3283064365386963e-10  # 1 - u, exact for small values
    series = w * (1.0 + w * (0.5 + w * (0.3333333333333333 + w * 0.25)))  # -log(1 - w), for w < 2^-6
    e = tl.where(w < 0.015625, series, -tl.log(u))
    return tl.log(e)


@triton.jit
def _race_update(best_key, best_id, logits_ptr, row_offsets, cols, end, inv_temp, threshold, bits, row_mask):
    """Fold one [ROWS, QUARTER] tile into the running best: key l / T - log E (sampled rows) or l (greedy rows,
    inv_temp 0), -inf past the end or below the threshold. Strictly greater: the earlier column keeps a tie."""
    mask = row_mask & (cols < end)
    logit = tl.load(logits_ptr + row_offsets + cols, mask=mask, other=0.0).to(tl.float32)
    key = tl.where(inv_temp > 0, logit * inv_temp - _exp1_log(bits), logit)
    key = tl.where(mask & (logit >= threshold), key, float("-inf"))
    better = key > best_key
    return tl.where(better, key, best_key), tl.where(better, cols, best_id)


# The sizes that change from step to step are not specialised on (Triton compiles a variant for an int that is 1
# or a multiple of 16): one compiled kernel per vocabulary, so the engine's warm-up compiles every one a run needs.
@triton.jit(do_not_specialize=["num_rows", "cols_per_split", "num_splits"])
def _race_kernel(logits_ptr, row_stride, inv_temp_ptr, threshold_ptr, seed_ptr, keys_ptr, ids_ptr,
                 num_rows, vocab, cols_per_split, num_splits, ROWS: tl.constexpr, QUARTER: tl.constexpr):
    """Program (row block, split): for each of ROWS rows, the best key and its column over the split's columns
    [split * cols_per_split, ...), written to keys/ids[row, split]."""
    split = tl.program_id(1)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_mask = (rows < num_rows)[:, None]
    inv_temp = tl.load(inv_temp_ptr + rows, mask=rows < num_rows, other=0.0)[:, None]
    threshold = tl.load(threshold_ptr + rows, mask=rows < num_rows, other=0.0)[:, None]
    seed = tl.load(seed_ptr + rows, mask=rows < num_rows, other=0)[:, None]
    row_offsets = rows.to(tl.int64)[:, None] * row_stride
    start = split * cols_per_split
    end = tl.minimum(start + cols_per_split, vocab)
    lanes = tl.arange(0, QUARTER)[None, :]
    best_key = tl.full([ROWS, QUARTER], float("-inf"), tl.float32)
    best_id = tl.zeros([ROWS, QUARTER], tl.int32)
    for offset in range(start, end, 4 * QUARTER):
        # One Philox call gives four words per counter: one for each quarter of the block.
        r0, r1, r2, r3 = tl.randint4x(seed, offset // 4 + lanes)
        best_key, best_id = _race_update(best_key, best_id, logits_ptr, row_offsets, offset + lanes, end,
                                         inv_temp, threshold, r0, row_mask)
        best_key, best_id = _race_update(best_key, best_id, logits_ptr, row_offsets, offset + QUARTER + lanes,
                                         end, inv_temp, threshold, r1, row_mask)
        best_key, best_id = _race_update(best_key, best_id, logits_ptr, row_offsets, offset + 2 * QUARTER + lanes,
                                         end, inv_temp, threshold, r2, row_mask)
        best_key, best_id = _race_update(best_key, best_id, logits_ptr, row_offsets, offset + 3 * QUARTER + lanes,
                                         end, inv_temp, threshold, r3, row_mask)
    top = tl.max(best_key, axis=1)
    first = tl.min(tl.where(best_key == top[:, None], best_id, 2147483647), axis=1)
    tl.store(keys_ptr + rows * num_splits + split, top, mask=rows < num_rows)
    tl.store(ids_ptr + rows * num_splits + split, first, mask=rows < num_rows)


def sample(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int | None]) -> torch.Tensor:
    """One next token per row, drawn as sampling.sample draws it (same distribution, other noise).

    logits: [batch, vocab] on a CUDA device, any float dtype. params[i]: row i's SamplingParams. seeds[i]: row i's
    seed_state (sampling.py) for a seeded sample, None to draw from torch's global RNG. Returns int64 [batch].
    """
    batch, vocab = logits.shape
    if len(params) != batch or len(seeds) != batch:
        raise ValueError(f"need one SamplingParams and one seed per logits row: {batch} rows, "
                         f"{len(params)} params, {len(seeds)} seeds")
    sampled = [p.temperature >= GREEDY_BELOW for p in params]
    inv_temperatures = np.array([1 / p.temperature if s else 0.0 for p, s in zip(params, sampled)], np.float32)
    row_seeds = _unseeded_row_seeds(batch)
    for row, seed in enumerate(seeds):
        if seed is not None:
            row_seeds[row] = seed
    device = logits.device
    return race(logits, _to_device(inv_temperatures, device), _thresholds(logits, params, sampled),
                _to_device(row_seeds, device))


def _thresholds(logits: torch.Tensor, params: list[SamplingParams], sampled: list[bool]) -> torch.Tensor:
    """[batch] float32 logit thresholds for the rows with a top-k / top-p cut, -inf elsewhere. The cut is
    sampling.filter_thresholds' on the temperature-scaled row, moved back to the raw logits as the smallest logit
    it keeps (scaling by 1/T keeps the order, so the set {logit >= that} is exactly the cut's set)."""
    batch, vocab = logits.shape
    thresholds = torch.full((batch,), float("-inf"), device=logits.device)
    cut = [i for i, (p, s) in enumerate(zip(params, sampled)) if s and (0 < p.top_k < vocab or p.top_p < 1)]
    if not cut:
        return thresholds
    rows = _to_device(np.array(cut, np.int64), logits.device)
    raw = logits[rows].float()
    temperatures = _to_device(np.array([params[i].temperature for i in cut], np.float32), logits.device)
    scaled = raw / temperatures[:, None]
    kept = scaled >= filter_thresholds(scaled, [params[i].top_k for i in cut], [params[i].top_p for i in cut])[:, None]
    thresholds[rows] = raw.masked_fill(~kept, float("inf")).amin(dim=-1)
    return thresholds


def _unseeded_row_seeds(batch: int) -> np.ndarray:
    """A fresh Philox key per row, from one draw of torch's global (CPU) RNG: torch.manual_seed still makes a
    run repeatable. The splitmix64 finaliser (as sampling._mix64, over an array) decorrelates the rows."""
    base = int(torch.randint(0, 2**62, (1,)).item())
    with np.errstate(over="ignore"):
        x = np.uint64(base) + np.arange(batch, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(1)).astype(np.int64)


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A small host array on the device by an asynchronous copy from pinned memory (no wait for the GPU)."""
    if device.type != "cuda":
        return torch.from_numpy(array).to(device)
    host = torch.from_numpy(array).pin_memory()
    return host.to(device, non_blocking=True)


def race(logits: torch.Tensor, inv_temperatures: torch.Tensor, thresholds: torch.Tensor, seeds: torch.Tensor,
         num_splits: int | None = None, rows_per_program: int | None = None) -> torch.Tensor:
    """One token per row: argmax_j (l_j * inv_temperature - log E_j) over the columns with l_j >= threshold.

    logits: [rows, vocab] any float dtype, last dim contiguous. inv_temperatures: float32 [rows], 0 = greedy
    (plain argmax, first index among ties, like torch.argmax). thresholds: float32 [rows], -inf = no cut.
    seeds: int64 [rows], the Philox key of each row's noise. Returns int64 [rows] on logits.device.
    num_splits (None: enough programs to fill the GPU) and rows_per_program (a power of two; None: one row of a
    model's vocabulary, many rows of a test's small one) choose the launch; the tokens depend on neither.
    """
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    quarter = block_quarter(vocab)
    block = 4 * quarter
    blocks = triton.cdiv(vocab, block)
    if num_splits is None:
        num_splits = _splits_to_fill(rows, logits.device)
    num_splits = max(1, min(num_splits, blocks))
    cols_per_split = triton.cdiv(blocks, num_splits) * block  # a multiple of the block: the noise stays put
    num_splits = triton.cdiv(vocab, cols_per_split)
    keys = torch.empty(rows, num_splits, dtype=torch.float32, device=logits.device)
    ids = torch.empty(rows, num_splits, dtype=torch.int32, device=logits.device)
    if rows_per_program is None:
        rows_per_program = 1 if quarter == MAX_QUARTER else min(2048, 16384 // block)
    if rows:
        grid = (triton.cdiv(rows, rows_per_program), num_splits)
        _race_kernel[grid](logits, logits.stride(0), inv_temperatures, thresholds, seeds, keys, ids, rows, vocab,
                           cols_per_split, num_splits, ROWS=rows_per_program, QUARTER=quarter)
    return ids.gather(1, keys.argmax(dim=1, keepdim=True)).squeeze(1).long()


# Programs per multiprocessor the vocabulary splits aim for. Each program walks its columns one block after
# another (a Philox call and two logarithms per column): it is latency-bound, so it takes many programs in flight
# to hide that (python benchmarks/sampler_launch.py, RESULTS.md 2026-12-01 sixth session).
PROGRAMS_PER_MULTIPROCESSOR = 16


def _splits_to_fill(rows: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    programs = PROGRAMS_PER_MULTIPROCESSOR * torch.cuda.get_device_properties(device).multi_processor_count
    return triton.cdiv(programs, max(rows, 1))
