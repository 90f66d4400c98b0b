"""What a long document gives from further back than the trained length, measured without
training a memory: the gain of an exact count cache of the document's earlier text over a model.

A model's short-context prediction (each piece of P tokens from an empty state: the "reset" score
of `titans eval by-position`) is blended with a count cache of the same document's earlier
pieces: variable-order context counts (orders 1..K, Witten-Bell interpolation, the model's
distribution as the order-0 base; the cache of Kuhn & De Mori 1990 and of Grave et al. 2017,
over contexts of tokens instead of hidden states). The cache holds only the pieces before the one
being scored (with --lag 2, only those before the previous piece, which a carried state already
reads at a piece's start; use it with --base previous). Its gain, model loss minus blended loss
by position bucket, is what one simple use of exact recall of the document is worth to that
model: evidence that the text holds something from that far back, and a yardstick for what a
memory takes of it. It is not a ceiling: a better blend, or a model that uses the text otherwise,
can gain more.

The blend's one free parameter (alpha, the weight of the lower order per distinct continuation)
is chosen on the other documents and reported on each (cross-fitted), so the gain is not tuned
on what it scores.

    python experiments/cache_gain.py --model runs/RUN [RUN ...] [--base previous --lag 2] [--orders 12]

Shape legend
    n pieces of one document, P piece length, V vocabulary
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict

import torch

from titans.cli.common import load_run
from titans.cli.positions import _documents, _trained_length
from titans.eval.by_position import BUCKETS

ALPHAS = tuple(2.0 ** i for i in range(13))   # 1 ... 4096


def model_probs(model, ids: torch.Tensor, piece: int, n: int, base: str, batch: int = 16) -> torch.Tensor:
    """[n, P, V]: the model's next-token distribution, every piece read from an empty state ("reset")
    or after the piece before it ("previous"; the first piece from an empty state)."""
    x = ids[:n * piece].view(n, piece)

    def last_piece(rows: torch.Tensor) -> torch.Tensor:   # [b, L] -> [b, P, V], in batches
        return torch.cat([model(rows[i:i + batch]).logits[:, -piece:].float().softmax(-1)
                          for i in range(0, rows.shape[0], batch)])
    with torch.no_grad():
        if base == "reset" or n == 1:
            return last_piece(x)
        return torch.cat([last_piece(x[:1]), last_piece(torch.cat([x[:-1], x[1:]], 1))])   # [n-1, 2P] pairs


def blended_losses(probs: torch.Tensor, ids: list[int], piece: int, orders: int, alphas, lag: int):
    """{alpha: [n] summed nll per piece} of the model blended with the cache, and [n] the model's own.

    Piece i is scored with the counts of every target in pieces < i - lag + 1."""
    n = probs.shape[0]
    counts = [defaultdict(lambda: defaultdict(int)) for _ in range(orders + 1)]   # order -> context -> next -> count
    own = [0.0] * n
    blended = {a: [0.0] * n for a in alphas}

    def add(i: int) -> None:   # the targets of piece i into the cache
        for t in range(i * piece, (i + 1) * piece):   # input position t, target ids[t + 1]
            nxt = ids[t + 1]
            for k in range(1, orders + 1):
                if t - k + 1 < 0:
                    break
                counts[k][tuple(ids[t - k + 1:t + 1])][nxt] += 1

    for i in range(n):
        if i - lag >= 0:
            add(i - lag)
        p_piece = probs[i].double().numpy()
        for s in range(piece):
            t = i * piece + s
            target = ids[t + 1]
            p_model = float(p_piece[s, target])
            own[i] -= math.log(max(p_model, 1e-30))
            # the contexts seen before, lowest order first; a context unseen at order k is unseen above it
            seen = []
            for k in range(1, orders + 1):
                if t - k + 1 < 0:
                    break
                table = counts[k].get(tuple(ids[t - k + 1:t + 1]))
                if table is None:
                    break
                seen.append((table.get(target, 0), sum(table.values()), len(table)))
            for a in alphas:
                p = p_model
                for c, total, distinct in seen:   # Witten-Bell: p_k = (c_k + a d_k p_{k-1}) / (n_k + a d_k)
                    p = (c + a * distinct * p) / (total + a * distinct)
                blended[a][i] -= math.log(max(p, 1e-30))
    return blended, own


def bucket_means(rows, pick, piece: int) -> list[float]:
    """Mean nll per token in each bucket over the given documents; pick(row) -> [n] summed nll per piece."""
    out = []
    for lo, hi in BUCKETS:
        tot = cnt = 0.0
        for row in rows:
            n, per_piece = row["n"], pick(row)
            tot += sum(per_piece[lo:min(hi, n)])
            cnt += piece * max(0, min(hi, n) - lo)
        out.append(tot / cnt if cnt else float("nan"))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", nargs="+", required=True, help="run directories (titans train --out), a row each")
    p.add_argument("--orders", type=int, default=12, help="the cache's longest context, tokens")
    p.add_argument("--lag", type=int, default=1, help="1: the cache holds every earlier piece; 2: all but the "
                   "previous one (what a carried state brings from further back than a piece)")
    p.add_argument("--base", choices=("reset", "previous"), default="reset",
                   help="the model's prediction the cache is blended with: each piece from an empty state, or "
                   "read after the piece before it (with --lag 2: the yardstick for what a carried state brings "
                   "from further back than a piece, carried minus previous of `titans eval by-position`)")
    p.add_argument("--piece", type=int, default=None, help="piece length (default: the trained length)")
    p.add_argument("--min-pieces", type=int, default=64)
    p.add_argument("--data", default=None)
    p.add_argument("--split", default="val")
    a = p.parse_args()
    last = max(hi for _, hi in BUCKETS)
    print(f"the model's {a.base} loss / the cache's gain over it (lag {a.lag}, orders 1-{a.orders}), nats per token "
          f"on the held-out documents; alpha of each document fitted on the others")
    print("| model | documents | alpha | " + " | ".join(f"{lo}-{hi}x" for lo, hi in BUCKETS) + " |")
    print("|---|---|---|" + "---|" * len(BUCKETS), flush=True)
    for path in a.model:
        model, tokenizer, ckpt = load_run(path)
        model.eval()
        piece = _trained_length(ckpt, a.piece, f"--model {path}")
        docs = _documents(argparse.Namespace(text=None, data=a.data, split=a.split, min_pieces=a.min_pieces,
                                             model=path), tokenizer, ckpt, piece)
        rows = []
        for name, ids in docs:
            n = min((ids.numel() - 1) // piece, last)
            blended, own = blended_losses(model_probs(model, ids, piece, n, a.base), ids.tolist(), piece,
                                          a.orders, ALPHAS, a.lag)
            rows.append(dict(name=name, n=n, blended=blended, own=own))

        def far_gain(subset, alpha):   # the gain at 4-64x, the buckets
            r = bucket_means(subset, lambda row: row["own"], piece)
            m = bucket_means(subset, lambda row: row["blended"][alpha], piece)
            return sum(r[2:4]) - sum(m[2:4])
        for j, row in enumerate(rows):   # cross-fitted: each document's alpha chosen on the others
            others = rows[:j] + rows[j + 1:] or [row]
            row["alpha"] = max(ALPHAS, key=lambda al: far_gain(others, al))
        r = bucket_means(rows, lambda row: row["own"], piece)
        m = bucket_means(rows, lambda row: row["blended"][row["alpha"]], piece)
        cells = [f"{x:.3f} / {x - y:+.3f}" if x == x else "-" for x, y in zip(r, m)]
        alphas = ", ".join(f"{row['alpha']:g}" for row in rows)
        print(f"| {path} | {len(rows)} | {alphas} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
