"""Triton kernel (GPU, or Triton's interpreter on CPU) that reduces one layer's attention to its per-token metrics
without ever writing a score block to memory: pure math, no hooks, no I/O. Launched by capture/triton_metrics.py.

Contract (the CPU kernel's, spectra/capture/cpu_kernels.py): for every row (query t of head h of sample b),
k_eff is exactly the integer `metrics.k_eff_from_probs` returns on the kernel's own probabilities p (ties and
thresholds hit exactly included; torch's CPU cumsum: a float64 running sum, rounded to float32 at each step and
compared with float32(threshold)); entropy, max_attn and the extended metrics match float64 eager attention
within the tests' tolerances. `WRITE_PROBS` writes those p (same program, same tiles), for the tests and for the
rare rows handed back to the sort definition (below).

Scores (`_tile`, the one score function every pass calls): s = scale * (q . k), fp32 accumulation (IEEE fp32
for float32 models; TF32 only for bf16 inputs, whose 8-bit mantissas TF32 holds exactly), then soft-capping
softcap * tanh(s / softcap), then visibility: causal j <= t, a sliding window t - j < window, and the model's
mask when one is given. One program takes BLOCK_M rows of one (sample, KV head): rows are (query, head of the
KV group) pairs, query-major, so a group's query heads share every key tile (grouped-query attention without
repeating keys). Every pass walks the same BLOCK_N-aligned key tiles with the same q tile and the launcher turns
FP fusion off, so each pass recomputes bit-identical scores, hence bit-identical p. (The tile sizes are a launch
parameter: the launcher picks larger ones for the interpreter, which pays per operation, not per element.)

Pass 1 (online softmax, as FlashAttention): per key tile, m' = max(m, max_j s_j), a = e^(m - m'), and with
z_j = max(s_j - m', -87) (the other paths' clamp: every visible key keeps p > 0 and exp stays normal)
    Z  <- a Z + sum e^z_j                       W <- a (W + (m - m') Z) + sum e^z_j z_j    (no cancellation)
    Wj <- a Wj + sum e^z_j j
so that lse = m + ln Z, entropy = ln Z - W / Z, attn_distance = t - Wj / Z, max_logit = m. The kernel's own
probabilities are p_j = exp(max(s_j - m, -87) - ln Z) for visible keys, 0 for the others; max_attn = exp(-ln Z)
is exactly the largest of them (z = 0 at the max) and sink_attn exactly p_0.

k_eff, exactly, in a few more passes over the key tiles with no sort of the row:
  * Narrowing: a per-row bracket [lo, hi) of float bit patterns of p (positive floats order as their bits). Each
    pass sums, over the row, p >= each of LEVELS - 2 levels spread evenly over the bracket's bits (plus "p > 0"):
    mass_l in float64 and count_l. For p >= 2^-29 these float64 sums are exact in any order (every p is a
    multiple of 2^-52 and the sums stay below 2), so mass_l IS the reference's running sum after its first
    count_l sorted values (the set {p >= level} is a prefix of the descending sort; equal values fall on the same
    side). Hence f32(mass_l) >= threshold says k_eff <= count_l, and < threshold says k_eff > count_l: the
    crossing lies in [level_l, level_l+1) for the highest level l that reaches the threshold. The bracket starts
    at [max((1 - t) / n * 0.999, 2^-29), 2 max p) (the CPU kernel's bound; if it falls short, [2^-29, lo) next)
    and shrinks ~14x per pass, until it holds <= CANDIDATES values or one bit pattern (ties).
  * Candidates: the <= CANDIDATES values inside the bracket are copied out (a per-row scratch of CANDIDATES
    floats); each one's prefix in the descending order (itself, the larger ones and the equal ones before it) is
    summed in float64 on top of the exact mass above the bracket; all are >= 2^-29, so these sums are exact and
    are the reference's prefixes, and k_eff = count above + 1 + #(f32(prefix) < threshold).
    A bracket of one bit pattern holds equal values v: the prefixes are above + k v, exact, and a binary search
    finds the first k that reaches the threshold.
  * The values >= 2^-29 not reaching the threshold (only for thresholds within ~n 2^-29 of 1: the row sums to
    1 within rounding): if the float64 total of every p > 0 plus a bound on the reference's rounding (n 2^-50)
    still rounds below the threshold, no prefix reaches it and k_eff = the count of p > 0 (the reference's
    cap); otherwise the row is flagged, and the launcher hands it to the sort definition on its WRITE_PROBS p.
NaN or +inf scores give NaN metrics and k_eff 0; a row with no visible key gives entropy NaN, max_attn inf and
k_eff 1, as the other paths do.

    TRITON_INTERPRET=1 python -m pytest tests/test_triton_metrics.py
"""

from __future__ import annotations

import triton
import triton.language as tl

# One tile configuration for every pass of a launch (bit-identical scores need it); these are the GPU's.
BLOCK_M = 32  # rows (query, group head) per program
BLOCK_N = 32  # keys per tile
LEVELS = 16  # columns of the narrowing pass: "p > 0" and LEVELS - 1 levels spanning the bracket
CANDIDATES = 64  # values a bracket may hold when its prefixes are formed
CHUNK = 4  # candidates compared with all the others at a time
# 14 intervals per pass: 10 passes cover the 2^30 float bit patterns from 2^-29 to 2 even after one restart.
NARROW_PASSES = 10
# Globals a compiled kernel reads must be constexpr. -87: cpu_kernels.MIN_SHIFTED_SCORE, written out in the kernel.
EXACT_BITS = tl.constexpr(0x30000000)  # float32 bits of 2^-29: float64 sums of floats >= this are exact (below 2)
INF_BITS = tl.constexpr(0x7F800000)
OUT_FIELDS = ("entropy", "max_attn", "sink_attn", "attn_distance", "max_logit", "lse")  # rows of `out`


@triton.jit
def _tile(q, k_base, stride_kt, stride_kd, mask_base, stride_mt, stride_ms, q_pos, row_ok, key_start, T, D,
          scale, softcap, window, m, log_z,
          HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
          PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """The one score function: (s, visible, p) for one key tile, each (BLOCK_M, BLOCK_N). s float32 scores,
    visible bool, p = exp(max(s - m, -87) - ln Z) on visible keys and 0 elsewhere: the kernel's probabilities
    once m and ln Z are known (pass 1 does not use p; the compiler drops it there). One helper, not three: each
    call of a jit helper costs ~8 ms in the interpreter."""
    keys = key_start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    k = tl.load(k_base + keys[None, :] * stride_kt + dims[:, None] * stride_kd,
                mask=(keys[None, :] < T) & (dims[:, None] < D), other=0.0)  # (D, N)
    s = tl.dot(q, k, input_precision=PRECISION) * scale
    if HAS_SOFTCAP:
        # tanh from exp (libdevice does not run in the interpreter): |error| ~1e-7, exact sign, +-1 at the ends
        x = s / softcap
        t = tl.exp(-2.0 * tl.abs(x))
        y = (1.0 - t) / (1.0 + t)
        s = softcap * tl.where(x < 0, -y, y)
    visible = (keys[None, :] <= q_pos[:, None]) & row_ok[:, None]
    if HAS_WINDOW:
        visible = visible & (keys[None, :] > q_pos[:, None] - window)
    if HAS_MASK:
        allowed = tl.load(mask_base + q_pos[:, None] * stride_mt + keys[None, :] * stride_ms,
                          mask=visible, other=0)
        visible = visible & (allowed != 0)
    # Hidden keys enter exp as -87 (not s - m, which may overflow there) and leave as 0.
    z = tl.maximum(tl.where(visible, s, float("-inf")) - m[:, None], -87.0)
    p = tl.where(visible, tl.exp(z - log_z[:, None]), 0.0)
    return s, visible, p


@triton.jit
def attention_metrics_kernel(
    q_ptr, k_ptr, mask_ptr, out_ptr, k_eff_ptr, flag_ptr, scratch_ptr, probs_ptr, slot_ptr,
    stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kt, stride_kd,
    stride_mb, stride_mt, stride_ms,
    T, D, H, KV, G, n_rows, scale, softcap, window, threshold,
    HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
    WRITE_PROBS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    LEVELS: tl.constexpr, CANDIDATES: tl.constexpr, CHUNK: tl.constexpr, NARROW_PASSES: tl.constexpr,
):
    """Grid (cdiv(G*T, BLOCK_M), B*KV). out (6, B*H*T) float32 (OUT_FIELDS), k_eff and flag (B*H*T,) int32,
    scratch (B*H*T, CANDIDATES) float32; WRITE_PROBS: probs (n, T) float32 gets p of rows whose slot >= 0."""
    pid_m = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b = pid_bk // KV
    kv = pid_bk % KV
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (query, group head) pairs, query-major
    row_ok = rows < T * G
    q_pos = tl.where(row_ok, rows // G, 0)
    head = kv * G + rows % G
    out_row = (b * H + head) * T + q_pos  # (B, H, T) flattened
    dims = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + b * stride_qb + head[:, None] * stride_qh + q_pos[:, None] * stride_qt
                + dims[None, :] * stride_qd, mask=row_ok[:, None] & (dims[None, :] < D), other=0.0)
    k_base = k_ptr + b * stride_kb + kv * stride_kh
    mask_base = mask_ptr + b * stride_mb
    first_query = pid_m * BLOCK_M // G
    key_end = tl.minimum(T, (pid_m * BLOCK_M + BLOCK_M - 1) // G + 1)  # causal: keys up to the last query
    key_begin = 0
    if HAS_WINDOW:
        key_begin = tl.maximum(first_query - window + 1, 0) // BLOCK_N * BLOCK_N

    # Pass 1: online max, Z, sum e z, sum e j; visible and NaN counts; the score of key 0.
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    z_sum = tl.zeros([BLOCK_M], tl.float32)
    ez_sum = tl.zeros([BLOCK_M], tl.float32)
    ej_sum = tl.zeros([BLOCK_M], tl.float32)
    n_visible = tl.zeros([BLOCK_M], tl.int32)
    n_nan = tl.zeros([BLOCK_M], tl.int32)
    s0 = tl.full([BLOCK_M], float("-inf"), tl.float32)
    # p is not used in pass 1 (the compiler drops it); m = +inf keeps the interpreter's exp from overflowing there.
    no_m = tl.full([BLOCK_M], float("inf"), tl.float32)
    no_log_z = tl.zeros([BLOCK_M], tl.float32)
    for key_start in range(key_begin, key_end, BLOCK_N):
        s, visible, _ = _tile(
            q, k_base, stride_kt, stride_kd, mask_base, stride_mt, stride_ms, q_pos, row_ok, key_start,
            T, D, scale, softcap, window, no_m, no_log_z,
            HAS_SOFTCAP, HAS_WINDOW, HAS_MASK, PRECISION, BLOCK_N, BLOCK_D,
        )
        keys = key_start + tl.arange(0, BLOCK_N)
        n_nan += tl.sum((visible & (s != s)).to(tl.int32), axis=1)
        n_visible += tl.sum(visible.to(tl.int32), axis=1)
        hidden = tl.where(visible & (s == s), s, float("-inf"))
        s0 = tl.maximum(s0, tl.max(tl.where(keys[None, :] == 0, hidden, float("-inf")), axis=1))
        m_new = tl.maximum(m, tl.max(hidden, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        started = m > float("-inf")
        alpha = tl.where(started, tl.exp(m - m_safe), 0.0)
        shift = tl.where(started, m - m_safe, 0.0)
        z = tl.maximum(hidden - m_safe[:, None], -87.0)
        e = tl.where(hidden > float("-inf"), tl.exp(z), 0.0)
        ez_sum = alpha * (ez_sum + shift * z_sum) + tl.sum(e * z, axis=1)
        z_sum = alpha * z_sum + tl.sum(e, axis=1)
        ej_sum = alpha * ej_sum + tl.sum(e * keys[None, :].to(tl.float32), axis=1)
        m = m_new
    bad = (n_nan > 0) | (m == float("inf"))
    m = tl.where(m == float("-inf"), 0.0, m)  # no visible key: as the other paths, max 0, Z 0
    has_mass = z_sum > 0.0
    log_z = tl.where(has_mass, tl.log(tl.where(has_mass, z_sum, 1.0)), float("-inf"))

    if WRITE_PROBS:
        slot = tl.load(slot_ptr + out_row, mask=row_ok, other=-1)
        if tl.max(slot, axis=0) >= 0:
            for key_start in range(0, T, BLOCK_N):
                s, visible, p = _tile(
                    q, k_base, stride_kt, stride_kd, mask_base, stride_mt, stride_ms, q_pos, row_ok, key_start,
                    T, D, scale, softcap, window, m, log_z,
                    HAS_SOFTCAP, HAS_WINDOW, HAS_MASK, PRECISION, BLOCK_N, BLOCK_D,
                )
                keys = key_start + tl.arange(0, BLOCK_N)
                tl.store(probs_ptr + slot[:, None].to(tl.int64) * T + keys[None, :], p,
                         mask=(slot[:, None] >= 0) & (keys[None, :] < T))
    else:
        z_safe = tl.where(has_mass, z_sum, 1.0)  # no 0 / 0 (nor the interpreter's warnings) for empty rows
        entropy = tl.where(has_mass, tl.maximum(log_z - ez_sum / z_safe, 0.0), float("nan"))
        max_attn = tl.exp(-log_z)
        sink = tl.where(s0 > float("-inf"), tl.exp(tl.maximum(s0 - m, -87.0) - log_z), 0.0)
        distance = tl.where(has_mass, q_pos.to(tl.float32) - ej_sum / z_safe, float("nan"))
        out = out_ptr + out_row
        tl.store(out + 0 * n_rows, tl.where(bad, float("nan"), entropy), mask=row_ok)
        tl.store(out + 1 * n_rows, tl.where(bad, float("nan"), max_attn), mask=row_ok)
        tl.store(out + 2 * n_rows, tl.where(bad, float("nan"), sink), mask=row_ok)
        tl.store(out + 3 * n_rows, tl.where(bad, float("nan"), distance), mask=row_ok)
        tl.store(out + 4 * n_rows, tl.where(bad, float("nan"), m), mask=row_ok)
        tl.store(out + 5 * n_rows, tl.where(bad, float("nan"), m + log_z), mask=row_ok)

        # k_eff: narrowing passes over the same tiles.
        cols = tl.arange(0, LEVELS)
        spans = tl.maximum(cols - 1, 0).to(tl.int64)
        bound = (1.0 - threshold) / tl.maximum(n_visible, 1).to(tl.float32) * 0.999
        lo = tl.maximum(bound.to(tl.int32, bitcast=True), EXACT_BITS).to(tl.int64)
        hi = tl.minimum(max_attn.to(tl.int32, bitcast=True).to(tl.int64) + (1 << 23), INF_BITS)
        hi = tl.maximum(hi, lo + 1)
        above = tl.zeros([BLOCK_M], tl.float64)
        n_above = tl.zeros([BLOCK_M], tl.int32)
        n_bracket = tl.zeros([BLOCK_M], tl.int32)
        n_positive = tl.zeros([BLOCK_M], tl.int32)
        total = tl.zeros([BLOCK_M], tl.float64)
        empty = ~has_mass
        k_eff = tl.where(bad, 0, 1)
        flag = tl.zeros([BLOCK_M], tl.int32)
        active = row_ok & ~bad & ~empty
        decided = ~active  # k_eff final (bad, empty, padding rows, or decided by the total)
        for _ in range(NARROW_PASSES):
            if tl.max(active.to(tl.int32), axis=0) > 0:
                levels = lo[:, None] + (hi - lo)[:, None] * spans[None, :] // (LEVELS - 2)  # (M, LEVELS)
                levels = tl.where(cols[None, :] == 0, 1, levels)  # column 0: every p > 0
                level_p = levels.to(tl.int32).to(tl.float32, bitcast=True)
                mass = tl.zeros([BLOCK_M, LEVELS], tl.float64)
                count = tl.zeros([BLOCK_M, LEVELS], tl.int32)
                for key_start in range(key_begin, key_end, BLOCK_N):
                    s, visible, p = _tile(
                        q, k_base, stride_kt, stride_kd, mask_base, stride_mt, stride_ms, q_pos, row_ok, key_start,
                        T, D, scale, softcap, window, m, log_z,
                        HAS_SOFTCAP, HAS_WINDOW, HAS_MASK, PRECISION, BLOCK_N, BLOCK_D,
                    )
                    reached = p[:, :, None] >= level_p[:, None, :]  # (M, N, LEVELS)
                    mass += tl.sum(tl.where(reached, p[:, :, None].to(tl.float64), 0.0), axis=1)
                    count += tl.sum(reached.to(tl.int32), axis=1)
                n_positive = tl.sum(tl.where(cols[None, :] == 0, count, 0), axis=1)
                total = tl.sum(tl.where(cols[None, :] == 0, mass, 0.0), axis=1)
                reaches = (mass.to(tl.float32) >= threshold) & (cols[None, :] >= 1)
                top = tl.sum(reaches.to(tl.int32), axis=1)  # levels 1..top reach it: the crossing is above `top`
                short = top == 0
                # The bracket [level top, level top + 1), or [level top, inf) past the last level.
                new_lo = tl.sum(tl.where(cols[None, :] == top[:, None], levels, 0), axis=1)
                last = top == LEVELS - 1
                new_hi = tl.where(last, INF_BITS, tl.sum(tl.where(cols[None, :] == top[:, None] + 1, levels, 0), axis=1))
                new_above = tl.sum(tl.where(cols[None, :] == top[:, None] + 1, mass, 0.0), axis=1)
                new_n_above = tl.sum(tl.where(cols[None, :] == top[:, None] + 1, count, 0), axis=1)
                new_n_bracket = tl.sum(tl.where(cols[None, :] == top[:, None], count, 0), axis=1) - new_n_above
                # Short of the threshold at the bracket's bottom: restart below it, or (already at 2^-29) decide by
                # the total, which bounds every prefix the reference forms.
                at_floor = lo <= EXACT_BITS
                restart = active & short & ~at_floor
                tiny = active & short & at_floor
                total_bound = total + n_positive.to(tl.float64) * 8.881784197001252e-16  # n 2^-50
                never = total_bound.to(tl.float32) < threshold
                k_eff = tl.where(tiny, tl.maximum(n_positive, 1), k_eff)
                flag = tl.where(tiny & ~never, 1, flag)
                narrowed = active & ~short
                hi = tl.where(restart, lo, tl.where(narrowed, new_hi, hi))
                lo = tl.where(restart, EXACT_BITS, tl.where(narrowed, new_lo, lo))
                above = tl.where(narrowed, new_above, above)
                n_above = tl.where(narrowed, new_n_above, n_above)
                n_bracket = tl.where(narrowed, new_n_bracket, n_bracket)
                decided = decided | tiny
                active = active & ~tiny & ~(narrowed & ((new_n_bracket <= CANDIDATES) | (new_hi - new_lo <= 1)))
        # Rows still active ran out of passes with a wide bracket (cannot happen: 10 passes exhaust the bits).
        flag = tl.where(active, 1, flag)
        settled = ~decided & ~active
        ties = settled & (n_bracket > CANDIDATES)
        few = settled & (n_bracket <= CANDIDATES)
        lo_p = lo.to(tl.int32).to(tl.float32, bitcast=True)
        hi_p = hi.to(tl.int32).to(tl.float32, bitcast=True)

        # One bit pattern, many equal values v: the prefixes above + k v are exact; first k reaching it.
        if tl.max(ties.to(tl.int32), axis=0) > 0:
            v = lo_p.to(tl.float64)
            k_low = tl.full([BLOCK_M], 1, tl.int32)
            k_high = tl.maximum(n_bracket, 1)
            for _ in range(26):  # n_bracket < 2^26
                middle = (k_low + k_high) // 2
                reach = (above + middle.to(tl.float64) * v).to(tl.float32) >= threshold
                k_high = tl.where(reach, middle, k_high)
                k_low = tl.where(reach, k_low, middle + 1)
            k_eff = tl.where(ties, n_above + k_low, k_eff)

        # At most CANDIDATES values in the bracket: copy them out; prefix sums in descending order on top of the mass above.
        if tl.max(few.to(tl.int32), axis=0) > 0:
            scratch = scratch_ptr + out_row.to(tl.int64)[:, None] * CANDIDATES
            filled = tl.zeros([BLOCK_M], tl.int32)
            for key_start in range(key_begin, key_end, BLOCK_N):
                s, visible, p = _tile(
                    q, k_base, stride_kt, stride_kd, mask_base, stride_mt, stride_ms, q_pos, row_ok, key_start,
                    T, D, scale, softcap, window, m, log_z,
                    HAS_SOFTCAP, HAS_WINDOW, HAS_MASK, PRECISION, BLOCK_N, BLOCK_D,
                )
                inside = few[:, None] & (p >= lo_p[:, None]) & (p < hi_p[:, None])
                slot = filled[:, None] + tl.cumsum(inside.to(tl.int32), axis=1) - 1
                tl.store(scratch + slot, p, mask=inside & (slot < CANDIDATES))
                filled += tl.sum(inside.to(tl.int32), axis=1)
            tl.debug_barrier()  # the stores above, by whichever threads, before the loads below
            cand_cols = tl.arange(0, CANDIDATES)
            held = few[:, None] & (cand_cols[None, :] < n_bracket[:, None])
            candidates = tl.load(scratch + cand_cols[None, :], mask=held, other=0.0)
            # Candidate i's prefix in the descending order: itself and every j larger, or equal and before it. The
            # sums are exact, so no sort is needed (tl.sort, a bitonic network, takes ~20 s per program in the
            # interpreter); the n prefixes formed are the reference's n prefixes.
            prefix = tl.zeros([BLOCK_M, CANDIDATES], tl.float64)
            chunk_cols = tl.arange(0, CHUNK)
            most = tl.max(tl.where(few, n_bracket, 0), axis=0)
            for j in range(0, most, CHUNK):  # CHUNK candidates j.. against all, (M, CHUNK, CANDIDATES) at a time
                c_j = tl.load(scratch + j + chunk_cols[None, :], mask=few[:, None] & (j + chunk_cols[None, :] < n_bracket[:, None]), other=0.0)
                before = (c_j[:, :, None] > candidates[:, None, :]) | (
                    (c_j[:, :, None] == candidates[:, None, :]) & (j + chunk_cols[None, :, None] <= cand_cols[None, None, :])
                )
                prefix += tl.sum(tl.where(before, c_j.to(tl.float64)[:, :, None], 0.0), axis=1)
            prefix += above[:, None]
            short_prefixes = tl.sum((held & (prefix.to(tl.float32) < threshold)).to(tl.int32), axis=1)
            k_eff = tl.where(few, n_above + short_prefixes + 1, k_eff)
        tl.store(k_eff_ptr + out_row, k_eff, mask=row_ok)
        tl.store(flag_ptr + out_row, flag, mask=row_ok)
