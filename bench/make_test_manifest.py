#!/usr/bin/env python3
"""Write a small routing manifest (the format `epa2a-tools bench` hands to bench/torch_peer.py) with random
routing, so that the PyTorch peer can be tried without the C# bench.

    python3 bench/make_test_manifest.py --dir /tmp/routing
    python3 bench/torch_peer.py --routing /tmp/routing --out /tmp/peer.json --device cpu

Default: two points with W=4 ranks, hidden 64, E=16 experts, topk 4, two routing sets each:
  tiny-t5          5 tokens on every rank;
  tiny-t37-mixed   37, 5, 0 and 37 tokens (tokens differ per rank; one rank sends nothing).
The first set of each point is uniform (topk distinct experts drawn uniformly), the second is skewed
(about 3/4 of the picks go to rank 0's experts), so some (source, destination) pairs carry no rows.
With --world (and --tokens/--hidden/--experts/--topk/--sets) uniform points of that shape are written
instead, one per --tokens value (e.g. the bench's largest: --world 8 --tokens 128,8192 --hidden 7168).

Pure Python (no numpy, no torch). Files are raw little-endian int32 [tokens, topk] per rank per set.
"""

import argparse
import json
import os
import random
import struct


def draw_token(rng, experts, topk, skewed, epr):
    """topk distinct expert ids in [0, experts)."""
    if not skewed:
        return rng.sample(range(experts), topk)
    picked = []
    while len(picked) < topk:
        e = rng.randrange(epr) if rng.random() < 0.75 else rng.randrange(experts)
        if e not in picked:
            picked.append(e)
    return picked


def write_ids(path, ids):
    flat = [e for token in ids for e in token]
    with open(path, "wb") as f:
        f.write(struct.pack("<%di" % len(flat), *flat))


def make_point(rng, directory, index, name, world, tokens, hidden, experts, topk, kinds):
    assert experts % world == 0 and 1 <= topk <= experts
    epr = experts // world
    sets = []
    for si, kind in enumerate(kinds):
        files = []
        for r in range(world):
            ids = [draw_token(rng, experts, topk, kind == "skewed", epr) for _ in range(tokens[r])]
            fname = "p%d_s%d_r%d.i32" % (index, si, r)
            write_ids(os.path.join(directory, fname), ids)
            files.append(fname)
        sets.append(files)
    return {"name": name, "world": world, "local": world, "tokens": max(tokens), "hidden": hidden,
            "topk": topk, "experts": experts, "routing": "+".join(kinds), "sets": sets}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True, help="directory to write manifest.json and the .i32 files into")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--world", type=int, help="custom points: ranks")
    ap.add_argument("--tokens", default="128", help="custom points: tokens per rank, comma-separated, one point each")
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--sets", type=int, default=1, help="custom points: uniform routing sets each")
    args = ap.parse_args()

    os.makedirs(args.dir, exist_ok=True)
    rng = random.Random(args.seed)
    if args.world is None:
        points = [
            make_point(rng, args.dir, 0, "tiny-t5", 4, [5, 5, 5, 5], 64, 16, 4, ["uniform", "skewed"]),
            make_point(rng, args.dir, 1, "tiny-t37-mixed", 4, [37, 5, 0, 37], 64, 16, 4, ["uniform", "skewed"]),
        ]
    else:
        points = []
        for i, t in enumerate(int(x) for x in args.tokens.split(",")):
            name = "custom-w%d-t%d-h%d" % (args.world, t, args.hidden)
            points.append(make_point(rng, args.dir, i, name, args.world, [t] * args.world, args.hidden,
                                     args.experts, args.topk, ["uniform"] * args.sets))
    manifest = {"seed": args.seed, "warmup": args.warmup, "iterations": args.iterations, "points": points}
    with open(os.path.join(args.dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print("wrote %s (%d points)" % (os.path.join(args.dir, "manifest.json"), len(points)))


if __name__ == "__main__":
    main()
