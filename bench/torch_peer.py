#!/usr/bin/env python3
"""PyTorch peer for `epa2a-tools bench`: the same MoE dispatch/combine exchange done "the obvious way" in PyTorch,
all W ranks simulated in ONE process on ONE device (every rank's buffers live on that device; a send is a
copy between rank buffers).

    python3 bench/torch_peer.py --routing DIR --out FILE.json [--device cuda] [--warmup 3] [--iterations N]
                                [--layout source-major|expert-major] [--combine sum|index_add]

DIR/manifest.json lists points; each point has routing sets, one raw little-endian int32 [tokens, topk] file
of expert ids per rank (tokens per rank = file size / 4 / topk). See bench/README.md for the output JSON.

Semantics (the same bytes as EpA2A): rank s has tokens [n_s, H] bf16 and ids [n_s, topk]; expert e lives on
rank e // (E / W). Dispatch delivers one row of H bf16 per (token, k) entry to the expert's rank; the experts
are the identity; combine gives each token, on its source rank, the sum of its topk received rows
(unweighted).

Dispatch (timed, routing bookkeeping included): per source rank, one stable sort of its flat ids (groups the
entries by destination rank and local expert; the token of an entry is its index // topk) and a searchsorted
of the expert boundaries (the per-expert counts; torch.bincount on CUDA would sync the host to size its
output). Then, by layout of a rank's receive buffer (same rows per rank either way, only the order differs):
  source-major (default): source rank, then local expert, then (token, k). The [W, W] counts go to the host
      (one device->host copy per dispatch) for the offsets; one index_select per (source, destination)
      writes straight into the destination's slice.
  expert-major: local expert, then source rank, then (token, k): EpA2A's exact order. Destination rows are
      computed on the device (cumsums, no host sync); per source, index_select of its rows into a temporary,
      then index_copy_ into the receive buffers.
Combine (timed):
  sum (default): per source, the receive row of each of its entries (a scatter of the sorted order),
      index_select of those rows into [n, topk, H], torch.sum over topk into the bf16 output (fp32
      accumulation, one rounding, like EpA2A).
  index_add: zero the output, index_add_ the rows in at their token (bf16 atomics, a rounding per add);
      source-major adds each (source, destination) slice directly, expert-major gathers first. Much slower
      on a GPU at large sizes (one atomic per element).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import statistics
import sys
import time

LAYOUTS = ("source-major", "expert-major")
COMBINES = ("sum", "index_add")


class ManifestError(Exception):
    pass


class CheckFailed(Exception):
    pass


# ----------------------------------------------------------------------------------------------------------
# Manifest (pure Python) and routing reference (numpy only): testable without torch.
# ----------------------------------------------------------------------------------------------------------

def load_manifest(routing_dir):
    """Read and validate DIR/manifest.json. Returns (seed, warmup, iterations, points); each point is a dict
    with name, world, local, hidden, topk, experts, routing, sets (absolute file paths, [set][rank]) and
    tokens (per rank, from the file sizes; the same in every set)."""
    path = os.path.join(routing_dir, "manifest.json")
    try:
        with open(path) as f:
            m = json.load(f)
    except (OSError, ValueError) as exc:
        raise ManifestError("cannot read %s: %s" % (path, exc))
    points_in = m.get("points")
    if not isinstance(points_in, list) or not points_in:
        raise ManifestError("%s: 'points' must be a non-empty list" % path)
    points = []
    for i, p in enumerate(points_in):
        name = str(p.get("name", "point%d" % i))
        try:
            world, hidden, topk, experts = (int(p[k]) for k in ("world", "hidden", "topk", "experts"))
            sets = p["sets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError("point %r: missing or bad field: %s" % (name, exc))
        if world < 1 or hidden < 1 or experts < 1 or not 1 <= topk <= experts:
            raise ManifestError("point %r: bad shape world=%d hidden=%d topk=%d experts=%d"
                                % (name, world, hidden, topk, experts))
        if experts % world:
            raise ManifestError("point %r: experts %d not divisible by world %d" % (name, experts, world))
        if not isinstance(sets, list) or not sets:
            raise ManifestError("point %r: 'sets' must be a non-empty list" % name)
        abs_sets, tokens = [], None
        for si, files in enumerate(sets):
            if not isinstance(files, list) or len(files) != world:
                raise ManifestError("point %r set %d: expected %d files (one per rank), got %r"
                                    % (name, si, world, files if not isinstance(files, list) else len(files)))
            paths = [os.path.join(routing_dir, str(fn)) for fn in files]
            n = []
            for fp in paths:
                try:
                    size = os.path.getsize(fp)
                except OSError as exc:
                    raise ManifestError("point %r set %d: %s" % (name, si, exc))
                if size % (4 * topk):
                    raise ManifestError("point %r set %d: %s has %d bytes, not a multiple of 4*topk=%d"
                                        % (name, si, fp, size, 4 * topk))
                n.append(size // (4 * topk))
            if tokens is None:
                tokens = n
            elif n != tokens:
                raise ManifestError("point %r: tokens per rank differ between sets: %r vs %r"
                                    % (name, tokens, n))
            abs_sets.append(paths)
        points.append({"name": name, "world": world, "local": p.get("local", world), "hidden": hidden,
                       "topk": topk, "experts": experts, "routing": p.get("routing"), "sets": abs_sets,
                       "tokens": tokens})
    return int(m.get("seed", 0)), m.get("warmup"), m.get("iterations"), points


def read_ids(np, path, topk, experts):
    """One rank's ids as an int64 numpy array [n, topk]; every id must be in [0, experts)."""
    a = np.fromfile(path, dtype="<i4")
    a = a.reshape(-1, topk).astype(np.int64)
    if a.size and (a.min() < 0 or a.max() >= experts):
        raise ManifestError("%s: expert ids outside [0, %d): min %d max %d"
                            % (path, experts, int(a.min()), int(a.max())))
    return a


def reference_routing(np, ids, world, experts, layout):
    """Independent numpy reference of a dispatch. ids: per rank [n_s, topk] int arrays.
    Returns (rows_per_rank [world], src_rows): src_rows[j] is the global source row (sum of the token counts
    of the ranks before s, plus the token) of row j of the receive buffers laid end to end, rank 0 first,
    each rank in `layout` order with (token, k) order inside a (source, expert) group."""
    epr = experts // world
    e_parts, s_parts, i_parts, g_parts = [], [], [], []
    row_base = 0
    for s, a in enumerate(ids):
        flat = np.asarray(a, dtype=np.int64).reshape(-1)
        topk = a.shape[1]
        e_parts.append(flat)
        s_parts.append(np.full(flat.size, s, dtype=np.int64))
        i_parts.append(np.arange(flat.size, dtype=np.int64))
        g_parts.append(row_base + np.arange(flat.size, dtype=np.int64) // topk)
        row_base += a.shape[0]
    e = np.concatenate(e_parts)
    s = np.concatenate(s_parts)
    i = np.concatenate(i_parts)
    g = np.concatenate(g_parts)
    d = e // epr
    if layout == "source-major":
        order = np.lexsort((i, e, s, d))   # last key is the primary one
    elif layout == "expert-major":
        order = np.lexsort((i, s, e))      # expert order is rank order, then local expert
    else:
        raise ValueError(layout)
    rows_per_rank = np.bincount(d, minlength=world)
    return [int(x) for x in rows_per_rank], g[order]


def summarize(samples):
    """median, p99 (nearest rank), mean, min and the samples (microseconds)."""
    xs = sorted(samples)
    if not xs:
        return {"median": None, "p99": None, "mean": None, "min": None, "samples": []}
    p99 = xs[max(0, math.ceil(0.99 * len(xs)) - 1)]
    return {"median": statistics.median(xs), "p99": p99, "mean": statistics.fmean(xs), "min": xs[0],
            "samples": list(samples)}


def payload_bytes(layout, combine, rows_total, tokens_total, hidden):
    """(dispatch, combine) row payload bytes read + written, counting each row read or written once per
    kernel that touches it (bf16 = 2 bytes; ids and index bookkeeping not counted; caches ignored).
    R = rows_total = sum over ranks of n_s * topk, N = tokens_total = sum of n_s, one row = H * 2 bytes.
      dispatch, source-major: read R token rows + write R received rows                  = 2 R
      dispatch, expert-major: gather (read R + write R) + index_copy_ (read R + write R)  = 4 R
      combine sum:       gather (read R + write R) + sum over topk (read R + write N)     = 3 R + N
      combine index_add: zero out (write N) + read R rows + read-modify-write R out rows  = 3 R + N,
                         plus a gather (read R + write R) in the expert-major layout      = 5 R + N"""
    row = hidden * 2
    d = (2 if layout == "source-major" else 4) * rows_total
    c = 3 * rows_total + tokens_total
    if combine == "index_add" and layout == "expert-major":
        c += 2 * rows_total
    return d * row, c * row


# ----------------------------------------------------------------------------------------------------------
# The peer itself (torch).
# ----------------------------------------------------------------------------------------------------------

class Peer:
    """All ranks of one point on one device. Buffers whose sizes do not depend on the routing (tokens,
    outputs, the receive buffers of all ranks laid end to end: sum_s n_s * topk rows in all) are made once;
    everything that depends on the routing is computed inside dispatch."""

    def __init__(self, torch, device, world, experts, topk, hidden, tokens, layout, combine_mode):
        self.torch = torch
        self.combine_mode = combine_mode
        self.W, self.E, self.K, self.H = world, experts, topk, hidden
        self.epr = experts // world
        self.layout = layout
        self.tokens = tokens                          # per rank [n_s, H] bf16
        self.n = [t.shape[0] for t in tokens]
        self.rows_total = sum(self.n) * topk
        self.recv = torch.empty(self.rows_total, hidden, dtype=torch.bfloat16, device=device)
        self.out = [torch.empty(n, hidden, dtype=torch.bfloat16, device=device) for n in self.n]
        self.edges = torch.arange(experts + 1, dtype=torch.int64, device=device)
        self.entry = [torch.arange(n * topk, dtype=torch.int64, device=device) for n in self.n]
        self.ids = None                               # per rank, flat [n_s * topk] int64, on the device

    def load_ids(self, ids_np):
        t = self.torch
        self.ids = [t.from_numpy(a.reshape(-1).copy()).to(self.recv.device) for a in ids_np]

    # --- source-major -----------------------------------------------------------------------------------
    def dispatch_source_major(self):
        t, W, K, epr = self.torch, self.W, self.K, self.epr
        tok, orders, vals_l, starts = [], [], [], []
        for s in range(W):
            vals, order = t.sort(self.ids[s], stable=True)   # entries grouped by expert = (rank, local)
            tok.append(t.div(order, K, rounding_mode="floor"))
            orders.append(order)
            vals_l.append(vals)
            starts.append(t.searchsorted(vals, self.edges))   # [E+1] first entry of each expert
        st = t.stack(starts)                                    # [W src, E+1]
        recv_expert_counts = st.diff(dim=1).sum(0).view(W, epr)  # what each rank's experts would get
        S = st[:, ::epr].tolist()                # host sync: [src][dst+1] entry offsets per destination
        C = [[S[s][d + 1] - S[s][d] for d in range(W)] for s in range(W)]
        rows = [sum(C[s][d] for s in range(W)) for d in range(W)]
        dst_off = [[0] * W for _ in range(W)]
        base = 0
        for d in range(W):
            for s in range(W):
                dst_off[s][d] = base
                base += C[s][d]
        for s in range(W):
            src = self.tokens[s]
            for d in range(W):
                c = C[s][d]
                if c:
                    t.index_select(src, 0, tok[s].narrow(0, S[s][d], c),
                                   out=self.recv.narrow(0, dst_off[s][d], c))
        return {"tok": tok, "order": orders, "vals": vals_l, "st": st, "C": C, "src_off": S,
                "dst_off": dst_off, "rows": rows, "recv_expert_counts": recv_expert_counts}

    def combine_source_major_index_add(self, h):
        W, C, S, D, tok = self.W, h["C"], h["src_off"], h["dst_off"], h["tok"]
        for s in range(W):
            o = self.out[s]
            o.zero_()
            for d in range(W):
                c = C[s][d]
                if c:
                    o.index_add_(0, tok[s].narrow(0, S[s][d], c), self.recv.narrow(0, D[s][d], c))
        return self.out

    # --- expert-major -----------------------------------------------------------------------------------
    def dispatch_expert_major(self):
        t, W, E, K, epr = self.torch, self.W, self.E, self.K, self.epr
        tok, orders, vals_l, starts = [], [], [], []
        for s in range(W):
            vals, order = t.sort(self.ids[s], stable=True)
            tok.append(t.div(order, K, rounding_mode="floor"))
            orders.append(order)
            vals_l.append(vals)
            starts.append(t.searchsorted(vals, self.edges))
        st = t.stack(starts)                     # [W src, E+1]
        ec = st.diff(dim=1)                      # [W src, E] entries per (source, expert)
        tot = ec.sum(0)                          # [E] rows per expert
        estart = tot.cumsum(0) - tot             # first row of each expert, all ranks end to end
        pre = ec.cumsum(0) - ec                  # rows of the same expert from earlier sources
        base = estart.unsqueeze(0) + pre - st[:, :E]   # [W, E]: dst row = base[s, e] + sorted entry index
        dst = []
        for s in range(W):
            if self.n[s] == 0:
                dst.append(None)
                continue
            rows = base[s].index_select(0, vals_l[s]) + self.entry[s]
            self.recv.index_copy_(0, rows, self.tokens[s].index_select(0, tok[s]))
            dst.append(rows)
        return {"tok": tok, "order": orders, "dst": dst, "rows_dev": tot.view(W, epr).sum(1),
                "recv_expert_counts": tot.view(W, epr)}

    def combine_expert_major_index_add(self, h):
        for s in range(self.W):
            o = self.out[s]
            o.zero_()
            if h["dst"][s] is not None:
                o.index_add_(0, h["tok"][s], self.recv.index_select(0, h["dst"][s]))
        return self.out

    # --- combine by gather + sum over topk (either layout) ------------------------------------------------
    def sorted_rows(self, h):
        """Per source, the receive-buffer row of each of its entries in sorted (expert) order."""
        if "dst" in h:
            return h["dst"]
        t, W, epr = self.torch, self.W, self.epr
        sd = h["st"][:, ::epr]                  # [W src, W+1] first entry of each destination
        cd = sd.diff(dim=1)                     # [W src, W dst] rows
        rows = cd.sum(0)
        delta = (rows.cumsum(0) - rows).unsqueeze(0) + (cd.cumsum(0) - cd) - sd[:, :W]
        out = []
        for s in range(W):
            if self.n[s] == 0:
                out.append(None)
                continue
            dest = t.div(h["vals"][s], epr, rounding_mode="floor")
            out.append(delta[s].index_select(0, dest) + self.entry[s])
        return out

    def combine_sum(self, h):
        t, K, H = self.torch, self.K, self.H
        rows_sorted = self.sorted_rows(h)
        for s in range(self.W):
            n = self.n[s]
            if n == 0:
                continue
            entry_row = t.empty_like(rows_sorted[s]).scatter_(0, h["order"][s], rows_sorted[s])
            t.sum(self.recv.index_select(0, entry_row).view(n, K, H), dim=1, out=self.out[s])
        return self.out

    def dispatch(self):
        if self.layout == "source-major":
            return self.dispatch_source_major()
        return self.dispatch_expert_major()

    def combine(self, h):
        if self.combine_mode == "sum":
            return self.combine_sum(h)
        if self.layout == "source-major":
            return self.combine_source_major_index_add(h)
        return self.combine_expert_major_index_add(h)

    def rows_per_rank(self, h):
        if "rows" in h:
            return list(h["rows"])
        return [int(x) for x in h["rows_dev"].tolist()]


class CudaTimer:
    """CUDA events around dispatch and around combine; a synchronize before each dispatch."""

    def __init__(self, torch):
        self.torch = torch
        self.pending = []

    def iteration(self, peer):
        t = self.torch
        t.cuda.synchronize()
        ev = [t.cuda.Event(enable_timing=True) for _ in range(4)]
        ev[0].record()
        h = peer.dispatch()
        ev[1].record()
        ev[2].record()
        peer.combine(h)
        ev[3].record()
        self.pending.append(ev)
        return h

    def collect(self):
        self.torch.cuda.synchronize()
        d = [ev[0].elapsed_time(ev[1]) * 1e3 for ev in self.pending]
        c = [ev[2].elapsed_time(ev[3]) * 1e3 for ev in self.pending]
        self.pending = []
        return d, c


class CpuTimer:
    """Wall clock (CPU ops are synchronous)."""

    def __init__(self, torch):
        self.d, self.c = [], []

    def iteration(self, peer):
        t0 = time.perf_counter()
        h = peer.dispatch()
        t1 = time.perf_counter()
        peer.combine(h)
        t2 = time.perf_counter()
        self.d.append((t1 - t0) * 1e6)
        self.c.append((t2 - t1) * 1e6)
        return h

    def collect(self):
        d, c = self.d, self.c
        self.d, self.c = [], []
        return d, c


def check_point(torch, np, peer, h, ids_np, point, layout, combine):
    """After the timed runs: rows per rank, every received row's content (against an independent numpy
    reference of the layout), and combine output == topk * token (bf16 rounding tolerance)."""
    name, W, E, K = point["name"], point["world"], point["experts"], point["topk"]
    exp_rows, src_rows = reference_routing(np, ids_np, W, E, layout)
    got_rows = peer.rows_per_rank(h)
    if got_rows != exp_rows:
        raise CheckFailed("point %r: rows per rank %r, expected %r" % (name, got_rows, exp_rows))
    if peer.rows_total:
        all_tokens = torch.cat(peer.tokens)
        idx = torch.from_numpy(src_rows).to(peer.recv.device)
        chunk = max(1, (256 << 20) // (peer.H * 2))
        for a in range(0, peer.rows_total, chunk):
            b = min(peer.rows_total, a + chunk)
            want = all_tokens.index_select(0, idx[a:b])
            if not torch.equal(peer.recv[a:b], want):
                row = a + int((peer.recv[a:b] != want).any(dim=1).nonzero()[0, 0])
                rank = max(d for d in range(W) if sum(exp_rows[:d]) <= row)
                raise CheckFailed("point %r: received row %d (on rank %d, %s layout) is not the token row the "
                                  "routing sends there" % (name, row, rank, layout))
        del all_tokens, idx
    # sum: K copies of a bf16 x add up exactly in fp32 and are rounded once: error <= 2^-8 |Kx|; allow twice.
    # index_add_ (bf16): partial sums k*x each rounded to bf16 (unit roundoff 2^-8), error
    # <= 2^-8 (K(K+1)/2 - 1) |x|; allow 2^-8 (K+1)/2 |Kx|, still < |x| for K <= 16.
    # Either way a missing or extra copy (error |x|) fails.
    rtol = 2.0 ** -7 if combine == "sum" else (K + 1) / 2.0 * 2.0 ** -8
    for s in range(W):
        if peer.n[s] == 0:
            continue
        expect = peer.tokens[s].float() * K
        err = (peer.out[s].float() - expect).abs()
        bad = err > expect.abs() * rtol + 1e-30
        if bool(bad.any()):
            nbad = int(bad.sum())
            tok = int(bad.any(dim=1).nonzero()[0, 0])
            raise CheckFailed("point %r: combine output of rank %d differs from %d * token in %d elements "
                              "(first bad token %d, max abs error %g)"
                              % (name, s, K, nbad, tok, float(err.max())))
    return exp_rows


def run_point(torch, np, args, seed, index, point, warmup, iterations):
    device = torch.device(args.device)
    W, H, K, E = point["world"], point["hidden"], point["topk"], point["experts"]
    ids_sets = [[read_ids(np, fp, K, E) for fp in files] for files in point["sets"]]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    g = torch.Generator(device=device)
    g.manual_seed(seed * 1000 + index)
    tokens = [torch.randn(n, H, generator=g, dtype=torch.bfloat16, device=device) for n in point["tokens"]]
    peer = Peer(torch, device, W, E, K, H, tokens, args.layout, args.combine)
    timer = CudaTimer(torch) if device.type == "cuda" else CpuTimer(torch)
    d_all, c_all, rows_by_set = [], [], []
    h = None
    for si, ids_np in enumerate(ids_sets):
        peer.load_ids(ids_np)                      # the only routing-dependent work outside the timing
        for _ in range(warmup):                    # untimed, every set
            peer.combine(peer.dispatch())
        h = None
        for _ in range(iterations):
            h = timer.iteration(peer)
        d, c = timer.collect()
        d_all += d
        c_all += c
        if h is None:                              # iterations == 0: still run once to check
            h = peer.dispatch()
            peer.combine(h)
        exp_rows = reference_routing(np, ids_np, W, E, args.layout)[0]
        got_rows = peer.rows_per_rank(h)
        if got_rows != exp_rows:
            raise CheckFailed("point %r set %d: rows per rank %r, expected %r"
                              % (point["name"], si, got_rows, exp_rows))
        rows_by_set.append(got_rows)
    check_point(torch, np, peer, h, ids_sets[-1], point, args.layout, args.combine)   # once, on the last set's state
    dispatch_bytes, combine_bytes = payload_bytes(args.layout, args.combine, peer.rows_total, sum(peer.n), H)
    result = {
        "name": point["name"], "world": W, "local": point["local"], "hidden": H, "topk": K, "experts": E,
        "routing": point["routing"], "layout": args.layout, "combine": args.combine, "sets": len(ids_sets),
        "warmup": warmup,
        "iterations": iterations,
        "dispatch_us": summarize(d_all), "combine_us": summarize(c_all),
        "rows_per_rank": [sum(r[d] for r in rows_by_set) for d in range(W)],
        "rows_per_rank_by_set": rows_by_set,
        "tokens_per_rank": list(point["tokens"]),
        "dispatch_bytes": dispatch_bytes, "combine_bytes": combine_bytes,
        "checked": True,
    }
    if device.type == "cuda":
        result["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    del peer, tokens, h
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description="PyTorch peer for `epa2a-tools bench` (see bench/README.md).")
    ap.add_argument("--routing", required=True, help="directory holding manifest.json and the .i32 files")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument("--warmup", type=int, default=None, help="untimed iterations per set (default: manifest, else 3)")
    ap.add_argument("--iterations", type=int, default=None, help="timed iterations per set (default: manifest, else 10)")
    ap.add_argument("--layout", choices=LAYOUTS, default="source-major",
                    help="order of rows in a rank's receive buffer (default source-major)")
    ap.add_argument("--combine", choices=COMBINES, default="sum",
                    help="sum: gather each token's topk rows back and sum them (fp32 accumulate, one bf16 "
                         "rounding; default); index_add: index_add_ the rows into the bf16 output")
    args = ap.parse_args(argv)

    try:
        seed, m_warmup, m_iters, points = load_manifest(args.routing)
    except ManifestError as exc:
        print("torch_peer: bad routing input: %s" % exc, file=sys.stderr)
        return 2
    warmup = args.warmup if args.warmup is not None else int(m_warmup if m_warmup is not None else 3)
    iterations = args.iterations if args.iterations is not None else int(m_iters if m_iters is not None else 10)
    if warmup < 0 or iterations < 0:
        print("torch_peer: warmup and iterations must be >= 0", file=sys.stderr)
        return 2

    import numpy as np
    import torch

    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("torch_peer: --device %s but CUDA is not available (use --device cpu)" % args.device,
                  file=sys.stderr)
            return 2
        if device.index is not None:
            torch.cuda.set_device(device)
        device_name = torch.cuda.get_device_name(device)
    elif device.type == "cpu":
        device_name = "cpu"
    else:
        print("torch_peer: unsupported device %s" % args.device, file=sys.stderr)
        return 2
    torch.manual_seed(seed)
    np.random.seed(seed % (2 ** 32))

    results = []
    for i, point in enumerate(points):
        try:
            results.append(run_point(torch, np, args, seed, i, point, warmup, iterations))
        except CheckFailed as exc:
            print("torch_peer: CHECK FAILED: %s" % exc, file=sys.stderr)
            return 1
        except ManifestError as exc:
            print("torch_peer: bad routing input: %s" % exc, file=sys.stderr)
            return 2
        r = results[-1]
        print("torch_peer: %s: dispatch %.1f us, combine %.1f us (median of %d), checked"
              % (r["name"], r["dispatch_us"]["median"] or 0.0, r["combine_us"]["median"] or 0.0,
                 len(r["dispatch_us"]["samples"])), flush=True)

    doc = {
        "device": device_name,
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "layout": args.layout,
        "combine": args.combine,
        "points": results,
    }
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(tmp, args.out)

    w = max([len("point")] + [len(r["name"]) for r in results])
    print("\nPyTorch peer (%s, %s layout, combine %s, torch %s)"
          % (device_name, args.layout, args.combine, torch.__version__))
    print("%-*s  %14s  %14s" % (w, "point", "dispatch us", "combine us"))
    for r in results:
        print("%-*s  %14.1f  %14.1f" % (w, r["name"], r["dispatch_us"]["median"] or 0.0,
                                       r["combine_us"]["median"] or 0.0))
    print("wrote %s" % args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
