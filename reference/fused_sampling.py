"""The GPU sampler: temperature, the top-k / top-p cut and the draw in two short kernels over the bf16 logits.

sampling.sample (the slow twin, any device) upcasts the whole [batch, vocab] block to float32, divides by the
temperature, takes a softmax, draws Exp(1) noise of the same size and divides: six passes over a 150 MB block for
256 rows of a 152k vocabulary. The exponential race says argmax_j p_j / E_j with E_j ~ Exp(1) is one draw from p;
its logarithm, argmax_j (l_j / T - log E_j), needs neither the softmax (its normaliser is the same for every j)
nor any float32 copy. Racing every column, though, costs a random number and two logarithms a column: one pass
that does so is bound by that arithmetic, not by reading the logits (0.16 ms at 256 rows on an H200).

So the race runs in two rounds over tiles of TILE columns. The first kernel reads each tile once and writes two
numbers: its log-mass log sum_j exp(l_j / T) (one exponential a column, no noise) and its largest logit. The second
races the tiles by log-mass (about 150 entrants a row), then the columns of the winning tile alone.
P(tile) * P(column | tile) = [sum_tile e^(l/T) / sum_all e^(l/T)] * [e^(l_j/T) / sum_tile e^(l/T)] = softmax(l / T)_j:
the same distribution, with noise for some 1,200 numbers a row instead of 152,000.

The noise comes from a counter-based generator (Philox): column j's is word 0 of counter j under the row's seed,
tile t's is word 1 of counter t. It depends only on the seed, the vocabulary size and TILE (never on the batch or
the launch), so a seeded row gets the same token whatever else is in the batch.

Top-k / top-p become one number per row: a logit threshold (sampling.filter_thresholds; tokens below it are out),
computed only for the rows that ask for a cut. Greedy rows (inverse temperature 0) take the plain argmax: the
first tile holding the largest logit, read again, and its first column holding it.

The noise is not torch's: torch's CUDA generator lays its stream out by launch configuration, so a seeded request
draws other tokens here than through sampling.sample on the same seed (same distribution, same contract).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from .sampling import GREEDY_BELOW, SamplingParams, filter_thresholds

# Columns per tile: a model's vocabulary takes MAX_TILE, a test's tiny one no wider than it needs. The tiles fix
# which columns race together in the second round, so changing MAX_TILE changes every seeded request's tokens.
MAX_TILE = 1024


def tile_width(vocab: int) -> int:
    return min(MAX_TILE, triton.next_power_of_2(vocab))


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
def _first_argmax(values, index):
    """Per row of values [ROWS, N]: the smallest index (index broadcasts to values) among the largest values."""
    top = tl.max(values, axis=1)
    return tl.min(tl.where(values == top[:, None], index, 2147483647), axis=1)


@triton.jit
def _scaled_kept(logits_ptr, row_offsets, cols, mask, inv_temp, threshold):
    """l / T for sampled rows, l for greedy ones (inv_temp 0); -inf past the end or below the threshold."""
    logit = tl.load(logits_ptr + row_offsets + cols, mask=mask, other=0.0).to(tl.float32)
    x = tl.where(inv_temp > 0, logit * inv_temp, logit)
    return tl.where(mask & (logit >= threshold), x, float("-inf"))


# The sizes that change from step to step are not specialised on (Triton compiles a variant for an int that is 1
# or a multiple of 16): one compiled kernel per vocabulary, so the engine's warm-up compiles every one a run needs.
@triton.jit(do_not_specialize=["num_rows", "tiles_per_split"])
def _tile_stats_kernel(logits_ptr, row_stride, inv_temp_ptr, threshold_ptr, log_mass_ptr, top_ptr,
                       num_rows, vocab, num_tiles, tiles_per_split, ROWS: tl.constexpr, TILE: tl.constexpr):
    """Program (row block, split): for each of ROWS rows and each tile of the split, the tile's log-mass
    log sum exp(x) and its largest x, written to [row, tile] of the two outputs. Two reductions a tile, not a
    third for where the largest is: the draw finds that in the one tile it needs."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < num_rows
    inv_temp = tl.load(inv_temp_ptr + rows, mask=row_ok, other=0.0)[:, None]
    threshold = tl.load(threshold_ptr + rows, mask=row_ok, other=0.0)[:, None]
    row_offsets = rows.to(tl.int64)[:, None] * row_stride
    lanes = tl.arange(0, TILE)[None, :]
    first = tl.program_id(1) * tiles_per_split
    for tile in range(first, tl.minimum(first + tiles_per_split, num_tiles)):
        cols = tile * TILE + lanes
        x = _scaled_kept(logits_ptr, row_offsets, cols, row_ok[:, None] & (cols < vocab), inv_temp, threshold)
        top = tl.max(x, axis=1)
        at_top = x == top[:, None]  # exp(0) spelled out: an all -inf tile gets log-mass -inf, a +inf top mass 1
        shift = tl.where(top > float("-inf"), top, 0.0)[:, None]
        mass = tl.sum(tl.where(at_top, 1.0, tl.exp(x - shift)), axis=1)
        out = rows * num_tiles + tile
        tl.store(log_mass_ptr + out, top + tl.log(mass), mask=row_ok)
        tl.store(top_ptr + out, top, mask=row_ok)


@triton.jit(do_not_specialize=["num_rows"])
def _draw_kernel(logits_ptr, row_stride, inv_temp_ptr, threshold_ptr, seed_ptr, log_mass_ptr, top_ptr, tokens_ptr,
                 num_rows, vocab, num_tiles, ROWS: tl.constexpr, TILE: tl.constexpr,
                 TILES: tl.constexpr):
    """Program (row block): each row's token. Greedy: the first tile holding the largest logit, its first column
    holding it. Sampled: the race of the tiles by log-mass, then of the winning tile's columns."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < num_rows
    inv_temp = tl.load(inv_temp_ptr + rows, mask=row_ok, other=0.0)[:, None]
    threshold = tl.load(threshold_ptr + rows, mask=row_ok, other=0.0)[:, None]
    seed = tl.load(seed_ptr + rows, mask=row_ok, other=0)[:, None]
    tiles = tl.arange(0, TILES)[None, :]
    tile_ok = row_ok[:, None] & (tiles < num_tiles)
    stats = rows[:, None] * num_tiles + tiles
    top_tile = _first_argmax(tl.load(top_ptr + stats, mask=tile_ok, other=float("-inf")), tiles)
    _, tile_bits, _, _ = tl.randint4x(seed, tiles)
    log_mass = tl.load(log_mass_ptr + stats, mask=tile_ok, other=float("-inf"))
    won = _first_argmax(tl.where(tile_ok, log_mass - _exp1_log(tile_bits), float("-inf")), tiles)
    tile = tl.where(inv_temp > 0, won[:, None], top_tile[:, None])  # the one tile a row reads again
    cols = tile * TILE + tl.arange(0, TILE)[None, :]
    row_offsets = rows.to(tl.int64)[:, None] * row_stride
    x = _scaled_kept(logits_ptr, row_offsets, cols, row_ok[:, None] & (cols < vocab), inv_temp, threshold)
    column_bits, _, _, _ = tl.randint4x(seed, cols)
    sampled_id = _first_argmax(x - _exp1_log(column_bits), cols)
    token = tl.where(tl.load(inv_temp_ptr + rows, mask=row_ok, other=0.0) > 0, sampled_id, _first_argmax(x, cols))
    tl.store(tokens_ptr + rows, token.to(tl.int64), mask=row_ok)


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
    row_seeds = _unseeded_row_seeds(batch)
    for row, seed in enumerate(seeds):
        if seed is not None:
            row_seeds[row] = seed
    inv_temperatures = [1 / p.temperature if s else 0.0 for p, s in zip(params, sampled)]
    seeds_on_device, inv_temperatures, thresholds = _row_inputs(row_seeds, inv_temperatures, logits.device)
    _cut_thresholds(thresholds, logits, params, sampled)
    return race(logits, inv_temperatures, thresholds, seeds_on_device)


def _row_inputs(row_seeds: np.ndarray, inv_temperatures: list[float], device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The race's per-row inputs on the device in one asynchronous copy from pinned memory (one copy, not three:
    each is a few microseconds of a decode step): int64 seeds, float32 inverse temperatures and float32 thresholds
    (-inf: no cut), laid out one after another in one byte buffer.

    Each part starts at a multiple of 16 bytes whatever the batch (rows padded to a multiple of 4): Triton compiles
    a kernel again for each pointer alignment it meets, and a part at 8 * batch bytes was aligned for even batches
    only, so a first odd batch compiled both sampling kernels anew inside a timed call (1.5 s on an H200)."""
    batch, padded = len(row_seeds), -(-len(row_seeds) // 4) * 4
    host = torch.empty(16 * padded, dtype=torch.uint8, pin_memory=device.type == "cuda")
    staged = host.numpy()
    temperatures_at, thresholds_at = 8 * padded, 12 * padded
    staged[:8 * batch].view(np.int64)[:] = row_seeds
    staged[temperatures_at:temperatures_at + 4 * batch].view(np.float32)[:] = inv_temperatures
    staged[thresholds_at:thresholds_at + 4 * batch].view(np.float32)[:] = float("-inf")
    buffer = host.to(device, non_blocking=True)
    return (buffer[:8 * batch].view(torch.int64),
            buffer[temperatures_at:temperatures_at + 4 * batch].view(torch.float32),
            buffer[thresholds_at:thresholds_at + 4 * batch].view(torch.float32))


def _cut_thresholds(thresholds: torch.Tensor, logits: torch.Tensor, params: list[SamplingParams],
                    sampled: list[bool]) -> None:
    """In place: the threshold of each row with a top-k / top-p cut (the others keep -inf). The cut is
    sampling.filter_thresholds' on the temperature-scaled row, moved back to the raw logits as the smallest logit
    it keeps (scaling by 1/T keeps the order, so the set {logit >= that} is exactly the cut's set)."""
    vocab = logits.shape[1]
    cut = [i for i, (p, s) in enumerate(zip(params, sampled)) if s and (0 < p.top_k < vocab or p.top_p < 1)]
    if not cut:
        return
    rows = _to_device(np.array(cut, np.int64), logits.device)
    raw = logits[rows].float()
    temperatures = _to_device(np.array([params[i].temperature for i in cut], np.float32), logits.device)
    scaled = raw / temperatures[:, None]
    kept = scaled >= filter_thresholds(scaled, [params[i].top_k for i in cut], [params[i].top_p for i in cut])[:, None]
    thresholds[rows] = raw.masked_fill(~kept, float("inf")).amin(dim=-1)


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
    """One token per row: a draw from softmax(l * inv_temperature) over the columns with l >= threshold.

    logits: [rows, vocab] any float dtype, last dim contiguous. inv_temperatures: float32 [rows], 0 = greedy
    (plain argmax, first index among ties, like torch.argmax). thresholds: float32 [rows], -inf = no cut.
    seeds: int64 [rows], the Philox key of each row's noise. Returns int64 [rows] on logits.device.
    num_splits and rows_per_program choose the launch (see tile_stats); the tokens depend on neither.
    """
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    rows_per_program = rows_per_program or _rows_per_program(vocab, logits.device)
    log_mass, top = tile_stats(logits, inv_temperatures, thresholds, num_splits, rows_per_program)
    tokens = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows:
        num_tiles = log_mass.shape[1]
        _draw_kernel[(triton.cdiv(rows, rows_per_program),)](
            logits, logits.stride(0), inv_temperatures, thresholds, seeds, log_mass, top, tokens, rows,
            vocab, num_tiles, ROWS=rows_per_program, TILE=tile_width(vocab), TILES=triton.next_power_of_2(num_tiles))
    return tokens


def tile_stats(logits: torch.Tensor, inv_temperatures: torch.Tensor, thresholds: torch.Tensor,
               num_splits: int | None = None, rows_per_program: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first round: [rows, tiles] log-mass and largest x (float32), for
    x = l * inv_temperature (l where it is 0), -inf below the threshold. logits as race's, last dim contiguous.
    num_splits: programs a row's tiles are split over (None: enough to fill the GPU); rows_per_program: a power
    of two (None: one row of a model's vocabulary, many rows of a test's small one)."""
    rows, vocab = logits.shape
    tile = tile_width(vocab)
    num_tiles = triton.cdiv(vocab, tile)
    num_splits = num_splits or _splits_to_fill(rows, logits.device)
    tiles_per_split = triton.cdiv(num_tiles, max(1, min(num_splits, num_tiles)))
    rows_per_program = rows_per_program or _rows_per_program(vocab, logits.device)
    log_mass = torch.empty(rows, num_tiles, dtype=torch.float32, device=logits.device)
    top = torch.empty_like(log_mass)
    if rows:
        grid = (triton.cdiv(rows, rows_per_program), triton.cdiv(num_tiles, tiles_per_split))
        _tile_stats_kernel[grid](logits, logits.stride(0), inv_temperatures, thresholds, log_mass, top, rows, vocab,
                                 num_tiles, tiles_per_split, ROWS=rows_per_program, TILE=tile, num_warps=2)
    return log_mass, top


def _rows_per_program(vocab: int, device: torch.device) -> int:
    """One row of a model's vocabulary a program on a GPU; a test's small rows, or any row in Triton's
    interpreter (which pays per program, not per element), many to a program."""
    tile = tile_width(vocab)
    return 1 if tile == MAX_TILE and device.type == "cuda" else min(2048, 16384 // tile)


# Programs per multiprocessor the first kernel's splits of the tiles aim for (python benchmarks/sampler_launch.py).
PROGRAMS_PER_MULTIPROCESSOR = 32


def _splits_to_fill(rows: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    programs = PROGRAMS_PER_MULTIPROCESSOR * torch.cuda.get_device_properties(device).multi_processor_count
    return triton.cdiv(programs, max(rows, 1))
