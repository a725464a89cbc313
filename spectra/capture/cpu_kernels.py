"""CPU kernels (Numba) that reduce one block of attention scores row by row: pure math, no hooks, no I/O.

Why compiled loops: torch reduces a block with one pass over memory per operation (max, subtract, clamp, exp,
sum, product, sum, divide, ...) and k_eff needed a full sort of every row, O(S log S) with a per-element cost
that grows with the row (1.1 ns at 512 keys, 13.6 ns at 8192 on this project's CPUs). Here each row is read
once from the block and everything else happens while it sits in cache: max, exp, the sums behind entropy and
the extended metrics, and k_eff, which sorts only the few keys that can be in its top set:

1. The sums pass also adds up the mass above a few fixed levels of e = exp(s - max) (e is 1 at the max); the
   highest level holding >= threshold of the mass is the cut. Failing that, the provable bound: every key of the
   top-k_eff set has p > (1 - threshold) / n, n = visible keys (were p_(k) <= (1 - t) / n, the remaining mass
   > 1 - t could not fit under it).
2. One scan copies out the keys above the cut (typically 1-2x k_eff keys) as p = e / Z.
3. A quickselect finds the fewest of them whose sum reaches the threshold: the running sum of the largest
   values, as `k_eff_from_probs` forms it, decides k_eff. When some candidate is below 2^-29 (where float64
   sums stop being exact, see _k_eff_selected) the candidates are sorted instead. If they fall short of the
   threshold (rounding), the bound's cut is tried, then every key.

Exactness: the keys kept are all those with e above some value, hence with p = e / Z above some value, so their
sorted order is the first m entries of the full sort (equal values are interchangeable), and the running sum is
accumulated as torch's CPU `cumsum` does (float64 accumulator, rounded to float32 at each step) and compared with
float32(threshold), as the reference does. That running sum never decreases, so the count of prefixes short of
the threshold is the reference's count.

Speed: the loops over whole rows are branch-free, so LLVM vectorizes them (AVX-512 here) or, where it cannot
(the compaction, the partitions), no branch mispredicts on data that looks random to the predictor.

    python -m pytest tests/test_k_eff.py tests/test_fast_metrics.py
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

# exp(-87) ~ 1.6e-38 is still a normal float32. Shifted scores further below the row max are raised to it, which
# keeps 2^n in the exp below a normal float; such a key gets p ~ 1e-38 instead of ~0, which no metric can see.
MIN_SHIFTED_SCORE = np.float32(-87.0)
# Levels of e = exp(s - max) whose mass the sums pass tracks for k_eff's cut (powers of 2: exact in float32).
CUT_LEVELS = np.array([2.0**-k for k in (1, 2, 3, 4, 6, 8, 11, 14)], dtype=np.float32)
ROWS_PER_TASK = 16  # rows one thread takes at a time: scratch reused across them, little idle time at the end
# Reassociation lets LLVM vectorize the reductions; no 'nnan'/'ninf', so NaN scores still reach the numerics guard.
VECTOR_MATH = {"reassoc", "nsz", "contract", "arcp"}

_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)  # ln 2 split in two (Cody-Waite), so x - n ln 2 loses no bits
_LN2_LO = np.float32(-2.12194440e-4)


@intrinsic
def _float_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the low 32 bits of an integer (LLVM bitcast: free, and vectorizable)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        value = args[0]
        if bits.bitwidth > 32:
            value = builder.trunc(value, ir.IntType(32))
        return builder.bitcast(value, ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def _bits_from_float(typingctx, value):
    """The bit pattern of a float32 as an int32."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(value), codegen


@numba.njit(nogil=True, cache=True, fastmath=VECTOR_MATH)
def _exp_shifted(scores, row_max, e):
    """e[j] = exp(max(s_j - max, -87)), 0 where s_j = -inf (masked). ~3 ulp. Every array (n,), from index 0.

    Written out because LLVM here has no vector exp (no SVML): 2^n times a degree-7 Taylor polynomial of
    r = x - n ln 2, |r| <= ln2 / 2, vectorizes; exp(0) is exactly 1, so max p = 1 / Z exactly.
    """
    for j in range(len(e)):
        x = max(scores[j] - row_max, MIN_SHIFTED_SCORE)
        n = math.floor(x * _LOG2E + np.float32(0.5))
        r = x - n * _LN2_HI - n * _LN2_LO
        poly = np.float32(1.0 / 5040.0)
        poly = poly * r + np.float32(1.0 / 720.0)
        poly = poly * r + np.float32(1.0 / 120.0)
        poly = poly * r + np.float32(1.0 / 24.0)
        poly = poly * r + np.float32(1.0 / 6.0)
        poly = poly * r + np.float32(0.5)
        poly = poly * r + np.float32(1.0)
        poly = poly * r + np.float32(1.0)
        scaled = poly * _float_from_bits((np.int32(n) + np.int32(127)) << 23)  # 2^n as float32, n >= -126
        e[j] = scaled if scores[j] > -np.inf else np.float32(0.0)


@numba.njit(nogil=True, cache=True)
def _row_max(scores):
    """Max of a row, computed on integer keys whose signed order is the float order: LLVM vectorizes an integer
    max but not a float one (not even with 'nnan'). A NaN score can win; _row_sums counts NaN scores anyway."""
    best = np.int32(-(2**31))
    for j in range(len(scores)):
        bits = _bits_from_float(scores[j])
        best = max(best, bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF)))  # negative floats: flip the magnitude
    return _float_from_bits(best ^ ((best >> 31) & np.int32(0x7FFFFFFF)))


@numba.njit(nogil=True, cache=True)
def _row_exp(row, e):
    """e = exp(row - max) for one row's visible scores (both arrays (n,)); returns the max, 0 for a row whose
    every key is masked (a row of zeros, which the numerics guard catches)."""
    row_max = _row_max(row)
    if row_max == -np.inf:
        row_max = np.float32(0.0)
    _exp_shifted(row, row_max, e)
    return row_max


@numba.njit(nogil=True, cache=True, fastmath=VECTOR_MATH)
def _row_sums(scores, row_max, e, level_mass):
    """(sum e, sum e z, sum e j, count of e > 0, count of NaN scores), z = max(s - max, -87); level_mass[i]
    (out) = sum of e above CUT_LEVELS[i]. Arrays (n,), from index 0."""
    # float32 accumulators (16 lanes, each summing ~S/16 terms): rounding ~1e-6 relative, well inside 1e-4.
    nan_scores = np.int32(0)
    allowed = np.int32(0)
    partition = weighted_shift = weighted_key = np.float32(0.0)
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = np.float32(0.0)
    for j in range(len(e)):
        value = e[j]
        shifted = max(scores[j] - row_max, MIN_SHIFTED_SCORE)
        partition += value
        weighted_shift += value * shifted  # masked keys: e = 0, z = -87
        weighted_key += value * np.float32(j)
        allowed += np.int32(value > 0)
        nan_scores += np.int32(scores[j] != scores[j])
        m0 += value if value > CUT_LEVELS[0] else np.float32(0.0)
        m1 += value if value > CUT_LEVELS[1] else np.float32(0.0)
        m2 += value if value > CUT_LEVELS[2] else np.float32(0.0)
        m3 += value if value > CUT_LEVELS[3] else np.float32(0.0)
        m4 += value if value > CUT_LEVELS[4] else np.float32(0.0)
        m5 += value if value > CUT_LEVELS[5] else np.float32(0.0)
        m6 += value if value > CUT_LEVELS[6] else np.float32(0.0)
        m7 += value if value > CUT_LEVELS[7] else np.float32(0.0)
    level_mass[0], level_mass[1], level_mass[2], level_mass[3] = m0, m1, m2, m3
    level_mass[4], level_mass[5], level_mass[6], level_mass[7] = m4, m5, m6, m7
    return partition, weighted_shift, weighted_key, allowed, nan_scores


@numba.njit(nogil=True, cache=True)
def _k_eff_sorted(probs, count, threshold32):
    """(k_eff, found) by sorting the count candidate probabilities: the running sum as torch's CPU cumsum forms
    it (float64 accumulator, float32 at each step), largest first."""
    top = probs[:count]
    top.sort()  # ascending; summed from the end
    running = 0.0
    for i in range(count - 1, -1, -1):
        running += np.float64(top[i])
        if np.float32(running) >= threshold32:
            return count - i, True
    return 0, False


@numba.njit(nogil=True, cache=True, fastmath={"reassoc"})
def _exact_sum(probs):
    """Sum of probs in float64; exact (so any order, hence 'reassoc') when each is >= 2^-29."""
    total = 0.0
    for k in range(len(probs)):
        total += np.float64(probs[k])
    return total


@numba.njit(nogil=True, cache=True)
def _move_front(values, pivot, strict):
    """Moves the values > pivot (strict) or == pivot (not strict) to the front, in place; returns their count.

    Branch-free (every value is swapped, the front grows only past the chosen ones): which side a probability
    falls on is a coin toss for the branch predictor; with a branch, the row kernel took 3.5 instead of 2.3 ns
    per score (real SmolLM2 rows, 2048 tokens)."""
    front = 0
    for i in range(len(values)):
        value = values[i]
        values[i] = values[front]
        values[front] = value
        front += (value > pivot) if strict else (value == pivot)
    return front


@numba.njit(nogil=True, cache=True)
def _k_eff_selected(probs, count, threshold32):
    """(k_eff, found) like _k_eff_sorted, in expected O(count) by quickselect: valid when every candidate is
    >= 2^-29, because then float64 sums of them are exact (lowest bit >= 2^-52, sums < 2), so every prefix sum
    is the same number whatever order its terms were added in."""
    running = 0.0  # exact sum of the probabilities taken so far, all larger than those left
    taken = 0
    first, last = 0, count  # the candidates not yet placed, probs[first:last]
    while last > first:
        pivot = probs[(first + last) // 2]
        above = first + _move_front(probs[first:last], pivot, True)
        mass_above = _exact_sum(probs[first:above])
        if np.float32(running + mass_above) >= threshold32:
            last = above  # the threshold is crossed among the larger ones (the pivot is not among them)
            continue
        running += mass_above
        taken += above - first
        equal = above + _move_front(probs[above:last], pivot, False)
        for _ in range(equal - above):  # equal values: one at a time
            running += np.float64(pivot)
            taken += 1
            if np.float32(running) >= threshold32:
                return taken, True
        first = equal
    return 0, False


@numba.njit(nogil=True, cache=True)
def _k_eff_above(e, partition, threshold, cut, buf):
    """(k_eff, found) from the keys with e > cut only; found is False when they do not reach the threshold."""
    count = 0
    for j in range(len(e)):  # branch-free, as in _move_front: always stored, kept only when above the cut
        value = e[j]
        buf[count] = value
        count += value > cut
    for i in range(count):
        buf[i] = buf[i] / partition  # p as float32, as the reference's probabilities
    threshold32 = np.float32(threshold)
    if cut / partition >= 2.0**-28:  # every candidate has p > 2^-28 (a margin over 2^-29 for rounding)
        return _k_eff_selected(buf, count, threshold32)
    return _k_eff_sorted(buf, count, threshold32)


@numba.njit(nogil=True, cache=True)
def _k_eff_row(e, partition, allowed, threshold, cut, buf):
    """k_eff of p = float32(e / partition) over the visible keys e (masked ones hold 0), the same integer as
    `k_eff_from_probs` on that row; `cut` is a first guess at a value of e below the top set."""
    if allowed == 0:
        return 1
    bound = np.float32(partition * ((1.0 - threshold) / len(e)) * 0.999)  # 0.999: room for rounding
    for attempt_cut in (cut, bound, np.float32(0.0)):
        if attempt_cut > cut:
            continue  # a higher cut than one that already fell short
        k_eff, found = _k_eff_above(e, partition, threshold, attempt_cut, buf)
        if found:
            return k_eff
        cut = attempt_cut
    # Every key with p > 0 summed and still short (rounding, threshold 1.0): the reference counts every prefix
    # and caps at the allowed keys.
    return allowed


@numba.njit(parallel=True, nogil=True, cache=True)
def k_eff_rows(e, partition, lo, hi, threshold, out):
    """k_eff of each row of p = float32(e / partition[r]) over the keys lo[r]:hi[r]. e (N, S) float32 >= 0."""
    n_rows, width = e.shape
    for task in numba.prange((n_rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        buf = np.empty(width, np.float32)
        for r in range(task * ROWS_PER_TASK, min(n_rows, (task + 1) * ROWS_PER_TASK)):
            # Loops over slices from 0: LLVM vectorizes `range(lo, hi)` with a run-time lo several times slower.
            visible = e[r][lo[r] : hi[r]]
            allowed = 0
            for j in range(len(visible)):
                allowed += visible[j] > 0
            bound = np.float32(partition[r] * ((1.0 - threshold) / max(len(visible), 1)) * 0.999)
            out[r] = _k_eff_row(visible, partition[r], allowed, threshold, bound, buf)


@numba.njit(parallel=True, nogil=True, cache=True)
def row_metrics(scores, lo, hi, key_offset, query_pos, threshold, entropy, max_attn, k_eff, extended):
    """Entropy, max_attn, k_eff (and the extended reductions) of every row of a block of scores.

    scores (N, S) float32, masked keys -inf, N a multiple of R (the block's (batch, head) pairs times its R
    queries); row r is query i = r % R, which sees keys lo[i]:hi[i], key j being position key_offset + j, and
    sits at position query_pos[i]; lo, hi, query_pos (R,) int64. Outputs (N,): entropy, max_attn float32, k_eff
    int32, and extended (4, N) float32 with rows sink_attn, attn_distance, max_logit, lse, or shape (4, 0).
    """
    n_rows, width = scores.shape
    want_extended = extended.shape[1] == n_rows
    for task in numba.prange((n_rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        e = np.empty(width, np.float32)
        buf = np.empty(width, np.float32)
        level_mass = np.empty(len(CUT_LEVELS), np.float32)
        for r in range(task * ROWS_PER_TASK, min(n_rows, (task + 1) * ROWS_PER_TASK)):
            query = r % len(lo)
            a, b = lo[query], hi[query]
            # Loops over slices from 0: LLVM vectorizes `range(lo, hi)` with a run-time lo several times slower.
            row = scores[r][a:b]
            ev = e[: b - a]
            row_max = _row_exp(row, ev)
            total, weighted_shift, weighted_key, allowed, nan_scores = _row_sums(row, row_max, ev, level_mass)
            if nan_scores or not math.isfinite(row_max):
                total = np.nan  # NaN (or +inf) scores: NaN metrics, for the numerics guard to report
            partition = np.float32(total)
            # -sum p ln p = ln Z - sum(e z) / Z, with z the shifted scores
            entropy[r] = max(np.float32(math.log(total) - weighted_shift / total), np.float32(0.0))
            max_attn[r] = np.float32(1.0) / partition
            if not math.isfinite(total):
                k_eff[r] = 0  # no distribution to count
                continue
            cut = np.float32(0.0)
            target = threshold * partition
            for level in range(len(CUT_LEVELS)):
                if level_mass[level] >= target:
                    cut = CUT_LEVELS[level]
                    break
            if cut == 0.0:
                cut = np.float32(partition * ((1.0 - threshold) / max(b - a, 1)) * 0.999)
            k_eff[r] = _k_eff_row(ev, partition, allowed, threshold, cut, buf)
            if want_extended:
                extended[0, r] = e[0] / partition if key_offset == 0 and a == 0 else np.float32(0.0)
                # sum p (t - j) = t - sum(e j) / Z, with j the key's absolute position key_offset + a + (local j)
                extended[1, r] = np.float32(query_pos[query] - key_offset - a - weighted_key / total)
                extended[2, r] = row_max
                extended[3, r] = np.float32(row_max + math.log(total))


@numba.njit(parallel=True, nogil=True, cache=True)
def row_probabilities(scores, lo, hi, probs):
    """The probabilities row_metrics measures, float32(e / Z) over lo[r]:hi[r] (0 elsewhere), for tests that
    hold its k_eff against the sort definition on exactly these values."""
    n_rows, width = scores.shape
    for r in numba.prange(n_rows):
        a, b = lo[r], hi[r]
        e = np.empty(b - a, np.float32)
        level_mass = np.empty(len(CUT_LEVELS), np.float32)
        row_max = _row_exp(scores[r][a:b], e)
        partition = np.float32(_row_sums(scores[r][a:b], row_max, e, level_mass)[0])
        probs[r, :] = 0.0
        for j in range(b - a):
            probs[r, a + j] = e[j] / partition
