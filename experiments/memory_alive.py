"""Does a trained model's long-term memory hold anything long-term? Streams held-out text
through a trained run in pieces and prints, per block, the norm of every memory matrix and
the validation loss of each piece.

    python experiments/memory_alive.py --model runs/demo          # after `make demo`
    python experiments/memory_alive.py --model runs/demo --tokens 32768 --piece 2048

The validation text is the run's prepared corpus (`titans data prepare`), read from its start;
a memory that decays to zero (the failure docs/models.md "The inner loop's parameterisation"
describes) shows as norms falling to 0 along the stream.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from titans import NeuralMemory
from titans.cli.common import load_run, token_file


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a run directory or checkpoint")
    p.add_argument("--data", default=None, help="prepared corpus directory (default: the byte corpus)")
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--piece", type=int, default=2048)
    args = p.parse_args()
    model, _, _ = load_run(args.model)
    ids = torch.from_numpy(np.asarray(token_file(args.data, "val").tokens[:args.tokens + 1], dtype=np.int64))
    if ids.numel() < args.tokens + 1:
        raise SystemExit(f"the validation split has {ids.numel()} tokens, fewer than --tokens {args.tokens} + 1")
    # an LMM block's mixer is the memory; MAC, MAG and MAL hold it as .memory
    layers = {f"blocks.{i}": b.mixer if isinstance(b.mixer, NeuralMemory) else getattr(b.mixer, "memory", None)
              for i, b in enumerate(model.blocks)}
    init = {k: [w.norm().item() for w in m.memory] for k, m in layers.items() if isinstance(m, NeuralMemory)}
    if not init:
        raise SystemExit("this model has no memory layers")
    print("W_0 norms: " + "  ".join(f"{k}: " + ",".join(f"{x:.3g}" for x in v) for k, v in init.items()))
    state = None
    with torch.no_grad():
        for i in range(0, args.tokens, args.piece):
            out = model(ids[None, i:i + args.piece], state=state, labels=ids[None, i + 1:i + args.piece + 1])
            state = out.state
            norms = {k: [w.norm().item() for w in s.memory.weights] for k, s in state.memories().items()}
            print(f"{i + args.piece:7d} tokens  loss {out.loss.item():.3f}  |W|: "
                  + "  ".join(f"{k}: " + ",".join(f"{x:.3g}" for x in v) for k, v in norms.items()), flush=True)


if __name__ == "__main__":
    main()
