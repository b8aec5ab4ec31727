"""Fused decode attention over the KV cache in its stored format: one Triton kernel reads the blocks, scores,
softmaxes and weights the values in registers (docs/ARCHITECTURE.md, "The GPU path").

Flash-decoding structure (Dao et al., 2023): the cached tokens are split across programs, grid (batch, splits);
each program walks its token range a tile of tokens at a time and keeps fp32 (max, sum, acc) for every query head,
which the host merges over splits by log-sum-exp (an empty split has max -inf and merges with weight 0).
One program covers all heads of its tokens, because a quantization block spans heads and tokens and one head's
slice of a token is a few bytes: a tile is (tokens, all channels of the stream), read as stored:

- plain fp16 / bf16 / fp32 values;
- token-major blocks (q8_0, q4_0, q4_1, nf4, q3_1, q2_1): value (t, c) is value t * W + c of the flat stream,
  block (t * W + c) // qb, so a block may span tokens; tokens from n_q on come from the exact fp16 window;
- channel-major blocks (`+ch`): value (t, c) is in block (t // G) * W + c, position t % G.

Scores are one matmul of the key tile with a block-diagonal query matrix (channels of K/V head k against the
query heads of its group), summed over the key streams (decoupled: semantic + geometric, queries pre-scaled);
the weighted values are the transposed product, from which the host keeps each head's own block. The null
column and rotations stay outside (production.cache.attend merges and rotates). The torch path is the reference;
this kernel runs where triton is importable on CUDA, and on CPU tensors under TRITON_INTERPRET=1 (the tests).
"""

from __future__ import annotations

import math

import torch

from production.cache.formats import FORMATS
from production.cache.kvcache import ChannelQuantStream, LayerCache, PlainStream
from production.cache.quant import NF4_CODEBOOK, on_device

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path serves
    triton = None

KIND_IDS = {"plain": 0, "q8_0": 1, "q4_0": 2, "q4_1": 3, "nf4": 4, "q3_1": 5, "q2_1": 6}
TILE_VALUES = 8192  # values per (tokens x channels) tile held in registers


def tile_tokens(padded_width: int) -> int:
    """Tokens per tile: as many as keep the widest stream's tile near TILE_VALUES, 16 to 128."""
    return min(128, max(16, TILE_VALUES // padded_width))


def interpreting() -> bool:
    """Whether Triton runs kernels through its interpreter (its TRITON_INTERPRET switch, read by triton)."""
    return triton is not None and bool(triton.knobs.runtime.interpret)


def available(device: torch.device | str) -> bool:
    """Whether the kernel can run on tensors of `device`: triton importable, and CUDA (or the interpreter)."""
    kind = torch.device(device).type
    return triton is not None and (kind == "cuda" or (kind == "cpu" and interpreting()))


def why_unavailable(device: torch.device | str) -> str:
    if triton is None:
        return "impl=triton needs the triton package (pip install triton)"
    return f"impl=triton runs on CUDA (or on CPU under TRITON_INTERPRET=1), not on {torch.device(device).type}"


def _pad(n: int) -> int:
    """Tile sizes are powers of two, and tl.dot needs at least 16."""
    return max(16, triton.next_power_of_2(n))


if triton is not None:

    @triton.jit
    def _tile(
        main_ptr,
        scale_ptr,
        win_ptr,
        sb_main,
        sb_scale,
        sb_win,
        n_q,
        nf4_ptr,
        b,
        t,
        c,
        valid,
        W: tl.constexpr,
        KIND: tl.constexpr,
        CHANNEL: tl.constexpr,
        QB: tl.constexpr,
        G: tl.constexpr,
        CB: tl.constexpr,
        NS: tl.constexpr,
    ):
        """Values (t, c) of one stream of sequence b as fp32; t (BT, 1) int64 tokens, c (1, WP) channels."""
        if KIND == 0:
            x = tl.load(main_ptr + b * sb_main + t * W + c, mask=valid, other=0.0).to(tl.float32)
        else:
            quant = valid & (t < n_q)
            if CHANNEL:
                block = (t // G) * W + c
                pos = t % G
            else:
                flat = t * W + c
                block = flat // QB
                pos = flat % QB
            codes = main_ptr + b * sb_main + block * CB
            scales = scale_ptr + b * sb_scale + block * NS
            d = tl.load(scales, mask=quant, other=0.0).to(tl.float32)
            if KIND == 1:  # q8_0: int8 codes
                x = tl.load(codes + pos, mask=quant, other=0).to(tl.float32) * d
            elif KIND == 5:  # q3_1: low two bits in a 2-bit plane, the high bit in a 1-bit plane after it
                low = (tl.load(codes + pos // 4, mask=quant, other=0).to(tl.int32) >> ((pos % 4) * 2)) & 3
                high = (tl.load(codes + QB // 4 + pos // 8, mask=quant, other=0).to(tl.int32) >> (pos % 8)) & 1
                m = tl.load(scales + 1, mask=quant, other=0.0).to(tl.float32)
                x = (low | (high << 2)).to(tl.float32) * d + m
            elif KIND == 6:  # q2_1: four codes per byte
                code = (tl.load(codes + pos // 4, mask=quant, other=0).to(tl.int32) >> ((pos % 4) * 2)) & 3
                m = tl.load(scales + 1, mask=quant, other=0.0).to(tl.float32)
                x = code.to(tl.float32) * d + m
            else:  # 4-bit pairs: code 2j in the low nibble of byte j
                code = (tl.load(codes + pos // 2, mask=quant, other=0).to(tl.int32) >> ((pos % 2) * 4)) & 15
                if KIND == 2:  # q4_0
                    x = (code - 8).to(tl.float32) * d
                elif KIND == 3:  # q4_1
                    m = tl.load(scales + 1, mask=quant, other=0.0).to(tl.float32)
                    x = code.to(tl.float32) * d + m
                else:  # nf4
                    x = tl.load(nf4_ptr + code, mask=quant, other=0.0) * d
            exact = valid & (t >= n_q)
            w = tl.load(win_ptr + b * sb_win + (t - n_q) * W + c, mask=exact, other=0.0).to(tl.float32)
            x = tl.where(t < n_q, x, w)
        return x

    # lengths change every step: no recompiles for a value that happens to be 1 or a multiple of 16
    @triton.jit(do_not_specialize=["n_arg", "k1_nq", "k2_nq", "v_nq", "split_tokens"])
    def _decode_splits(
        # first key stream and its block-diagonal queries (B, K1P, HP)
        k1_main, k1_scale, k1_win, k1_sbm, k1_sbs, k1_sbw, k1_nq, q1_ptr,
        # second key stream (decoupled: geometric), ignored unless TWO_KEYS
        k2_main, k2_scale, k2_win, k2_sbm, k2_sbs, k2_sbw, k2_nq, q2_ptr,
        # value stream
        v_main, v_scale, v_win, v_sbm, v_sbs, v_sbw, v_nq,
        nf4_ptr, m_out, l_out, acc_out, n_arg, split_tokens,
        K1W: tl.constexpr, K1P: tl.constexpr, K1KIND: tl.constexpr, K1CH: tl.constexpr,
        K1QB: tl.constexpr, K1G: tl.constexpr, K1CB: tl.constexpr, K1NS: tl.constexpr,
        K2W: tl.constexpr, K2P: tl.constexpr, K2KIND: tl.constexpr, K2CH: tl.constexpr,
        K2QB: tl.constexpr, K2G: tl.constexpr, K2CB: tl.constexpr, K2NS: tl.constexpr,
        VW: tl.constexpr, VP: tl.constexpr, VKIND: tl.constexpr, VCH: tl.constexpr,
        VQB: tl.constexpr, VG: tl.constexpr, VCB: tl.constexpr, VNS: tl.constexpr,
        HP: tl.constexpr, TWO_KEYS: tl.constexpr, BT: tl.constexpr, PRECISION: tl.constexpr,
        COUNTS_IN_MEMORY: tl.constexpr,
    ):  # fmt: skip
        if COUNTS_IN_MEMORY:  # a static step (CUDA graphs): the lengths are read from device counters
            n = tl.load(n_arg)
            k1_n_q = tl.load(k1_nq)
            k2_n_q = tl.load(k2_nq)
            v_n_q = tl.load(v_nq)
        else:
            n = n_arg
            k1_n_q = k1_nq
            k2_n_q = k2_nq
            v_n_q = v_nq
        b = tl.program_id(0).to(tl.int64)
        s = tl.program_id(1)
        n_splits = tl.num_programs(1)
        start = s * split_tokens
        end = tl.minimum(n, start + split_tokens)
        heads = tl.arange(0, HP)
        c1 = tl.arange(0, K1P)
        q1 = tl.load(q1_ptr + b * K1P * HP + c1[:, None] * HP + heads[None, :])
        c2 = tl.arange(0, K2P)
        if TWO_KEYS:
            q2 = tl.load(q2_ptr + b * K2P * HP + c2[:, None] * HP + heads[None, :])
        cv = tl.arange(0, VP)
        m = tl.full((HP,), float("-inf"), tl.float32)
        l = tl.zeros((HP,), tl.float32)
        acc = tl.zeros((HP, VP), tl.float32)
        for t0 in range(start, end, BT):  # every tile holds at least one token, so m turns finite at once
            t = (t0 + tl.arange(0, BT)).to(tl.int64)[:, None]
            live = t < end
            k = _tile(k1_main, k1_scale, k1_win, k1_sbm, k1_sbs, k1_sbw, k1_n_q, nf4_ptr, b, t, c1[None, :],
                      live & (c1[None, :] < K1W), K1W, K1KIND, K1CH, K1QB, K1G, K1CB, K1NS)  # fmt: skip
            scores = tl.dot(k, q1, input_precision=PRECISION)  # (BT, HP)
            if TWO_KEYS:
                k = _tile(k2_main, k2_scale, k2_win, k2_sbm, k2_sbs, k2_sbw, k2_n_q, nf4_ptr, b, t, c2[None, :],
                          live & (c2[None, :] < K2W), K2W, K2KIND, K2CH, K2QB, K2G, K2CB, K2NS)  # fmt: skip
                scores += tl.dot(k, q2, input_precision=PRECISION)
            scores = tl.where(live, scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=0))
            alpha = tl.exp(m - m_new)
            p = tl.exp(scores - m_new[None, :])
            l = l * alpha + tl.sum(p, axis=0)
            v = _tile(v_main, v_scale, v_win, v_sbm, v_sbs, v_sbw, v_n_q, nf4_ptr, b, t, cv[None, :],
                      live & (cv[None, :] < VW), VW, VKIND, VCH, VQB, VG, VCB, VNS)  # fmt: skip
            acc = acc * alpha[:, None] + tl.dot(tl.trans(p), v, input_precision=PRECISION)
            m = m_new
        row = b * n_splits + s
        tl.store(m_out + row * HP + heads, m)
        tl.store(l_out + row * HP + heads, l)
        tl.store(acc_out + row * HP * VP + heads[:, None] * VP + cv[None, :], acc)


def _stream_args(stream) -> tuple[list, list]:
    """(runtime args, constexpr args) of one stream: pointers, batch strides and n_q; width, padded width, kind,
    channel-major, qb, tokens per group, code bytes and scales per block."""
    if isinstance(stream, PlainStream):
        data = stream.data
        return [data, data, data, data.stride(0), 0, 0, 0], [stream.width, _pad(stream.width), 0, False, 1, 1, 1, 1]
    spec, fmt = stream.spec, FORMATS[stream.spec.kind]
    runtime = [stream.codes, stream.scale, stream.window]
    runtime += [stream.codes.stride(0), stream.scale.stride(0), stream.window.stride(0), stream.n_q]
    meta = [stream.width, _pad(stream.width), KIND_IDS[spec.kind], isinstance(stream, ChannelQuantStream)]
    return runtime, meta + [spec.qb, stream.group, fmt.code_bytes(spec.qb), fmt.scales]


def _block_diagonal(q: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """q (B, Hkv, g, d) -> (B, rows, cols) fp32, zero-padded: entry (k * d + i, k * g + r) = q[:, k, r, i], so a
    key tile (T, Hkv * d) times it scores each query head against its own K/V head."""
    B, Hkv, g, d = q.shape
    eye = torch.eye(Hkv, device=q.device, dtype=torch.float32)
    bd = torch.einsum("bkri,kl->blikr", q.float(), eye).reshape(B, Hkv * d, Hkv * g)
    out = torch.zeros(B, rows, cols, device=q.device, dtype=torch.float32)
    out[:, : Hkv * d, : Hkv * g] = bd
    return out


def default_split(n: int, batch: int, device: torch.device, block_t: int) -> int:
    """Tokens per split: enough programs to fill the device twice over, at least 4 tiles each."""
    programs = torch.cuda.get_device_properties(device).multi_processor_count * 2 if device.type == "cuda" else 4
    per_seq = max(1, programs // batch)
    return max(4 * block_t, -(-math.ceil(n / per_seq) // block_t) * block_t)


def decode_partials(
    cache: LayerCache,
    qs: dict[str, torch.Tensor],
    v_name: str,
    split_tokens: int | None = None,
    n_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One query token per sequence attends over all `cache.length` cached tokens.

    qs: key stream name -> (B, Hkv, g, d) fp32 queries, scaled (and rotated as the stream is), one or two streams.
    Returns the softmax state merged over splits, per query head: max (B, Hkv, g, 1), sum (B, Hkv, g, 1) and
    unnormalised weighted values (B, Hkv, g, dv), ready to merge with the null column (production.cache.attend).
    split_tokens defaults to `default_split`; n_splits (default: enough to cover the cache) may exceed it, the
    extra splits being empty.
    """
    names = list(qs)
    if not 1 <= len(names) <= 2:
        raise ValueError(f"the fused decode takes one or two key streams, got {names}")
    first = qs[names[0]]
    B, Hkv, g, _ = first.shape
    device, step = first.device, cache.step
    n = cache.length if step is None else step.bucket  # a static step covers its bucket; later splits are empty
    v_stream = cache.streams[v_name]
    dv = v_stream.width // Hkv
    HP = _pad(Hkv * g)
    block_t = tile_tokens(max(_pad(cache.streams[name].width) for name in [*names, v_name]))
    split = split_tokens or default_split(n, B, device, block_t)
    n_splits = n_splits or -(-n // split)

    def stream(name: str, q: torch.Tensor | None) -> tuple[list, list]:
        """One stream's kernel arguments (runtime, constexpr), its block-diagonal queries after a key stream's."""
        runtime, const = _stream_args(cache.streams[name])
        if step is not None:
            runtime[-1] = step.n_q[name]  # n_q from the counters
        return (runtime if q is None else [*runtime, _block_diagonal(q, const[1], HP)]), const

    k1 = stream(names[0], qs[names[0]])
    # with one key stream TWO_KEYS is off and the kernel never reads the second stream's slots: they repeat the first's
    k2 = stream(names[1], qs[names[1]]) if len(names) == 2 else k1
    v = stream(v_name, None)
    args, meta = k1[0] + k2[0] + v[0], k1[1] + k2[1] + v[1]
    VP = v[1][1]
    m = torch.empty(B, n_splits, HP, device=device)
    l = torch.empty_like(m)
    acc = torch.empty(B, n_splits, HP, VP, device=device)
    n_arg = cache.length if step is None else step.n
    precision = "ieee" if device.type == "cpu" else "tf32"
    # 8 warps keep the small presets' tiles in registers; wide streams pipeline less to fit shared memory (sm_90)
    stages = 2 if max(k1[1][1], k2[1][1], VP) <= 256 else 1
    _decode_splits[(B, n_splits)](
        *args, on_device(NF4_CODEBOOK, device), m, l, acc, n_arg, split,
        *meta, HP, len(names) == 2, block_t, precision, step is not None, num_warps=8, num_stages=stages,
    )  # fmt: skip
    # merge the splits by log-sum-exp; an empty split (max -inf) weighs 0
    M = m.amax(dim=1, keepdim=True)
    w = torch.where(m == float("-inf"), torch.zeros_like(m), torch.exp(m - M))
    L = (l * w).sum(dim=1)  # (B, HP)
    A = (acc * w[..., None]).sum(dim=1)  # (B, HP, VP)
    # keep each query head's own K/V head block of the weighted values
    A = A[:, : Hkv * g, : Hkv * dv].reshape(B, Hkv, g, Hkv, dv).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)
    shape = (B, Hkv, g, 1)
    return M[:, 0, : Hkv * g].reshape(shape), L[:, : Hkv * g].reshape(shape), A
