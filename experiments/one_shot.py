"""One write at a default NeuralMemory layer's gates: how far f(k*) moves towards v* after the write and
N other tokens (random unit keys, values of the memory's own output scale), per depth 1-4, over 5
seeds x 2 heads (head dim 128); prints min and mean. Layer overrides as JSON:

    python experiments/one_shot.py '{"chunk_size": 64}'

The figures of docs/models.md "The inner loop's parameterisation" (one-shot table); the test
tests/layers/test_neural_memory.py::test_a_pair_written_once_is_read_back measures the same.
"""
import sys, json, torch
import torch.nn.functional as F
from titans import NeuralMemory
from titans.ops import memory_rule
from titans.ops.nets import memory_forward

def progress(depth, seed, dim=256, heads=2, N=64, **kw):
    torch.manual_seed(seed)
    layer = NeuralMemory(dim, heads, memory_depth=depth, **kw)
    H, D = layer.heads, layer.head_dim
    x = torch.zeros(1, N + 1, dim)
    theta, eta, alpha, _ = layer._gates(x, layer.init_state(1))
    g = torch.Generator().manual_seed(seed + 100)
    k = F.normalize(torch.randn(1, N + 1, H, D, generator=g), dim=-1)
    W0 = [w.detach() for w in layer.memory]
    f0 = memory_forward(k.transpose(1, 2), [w.unsqueeze(0) for w in W0])  # [1,H,N+1,D]
    scale = f0.pow(2).mean().sqrt()
    v = torch.randn(1, N + 1, H, D, generator=g) * scale
    with torch.no_grad():
        _, st = memory_rule(k, k, v, theta, eta, alpha, W0, chunk_size=layer.chunk_size,
                            normalize_step=layer.normalize_step)
        fT = memory_forward(k[:, :1].transpose(1, 2), st.weights)[:, :, 0]   # [1,H,D]
    gap = v[:, 0] - f0[:, :, 0]
    return ((fT - f0[:, :, 0]) * gap).sum(-1) / gap.pow(2).sum(-1)  # [1,H]

if __name__ == "__main__":
    kw = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    for depth in (1, 2, 3, 4):
        p = torch.cat([progress(depth, s, **kw).flatten() for s in range(5)])
        print(f"depth {depth}: min {p.min():.2f} mean {p.mean():.2f}", kw, flush=True)
