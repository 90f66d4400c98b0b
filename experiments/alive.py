"""A default NeuralMemory layer (dim 64, 2 heads) on 16K random inputs, per depth 1-4: output RMS
over the first and last 1K tokens, and the memory's norms against W_0. Layer overrides as JSON:

    python experiments/alive.py '{"chunk_size": 64}'

The chunk-size figures of docs/models.md "The inner loop's parameterisation"; the test
tests/layers/test_neural_memory.py::test_memory_stays_alive_over_16k_tokens holds the defaults.
"""
import sys, json, time, torch
from titans import NeuralMemory
kw = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
for depth in (1, 2, 3, 4):
    torch.manual_seed(0)
    layer = NeuralMemory(64, 2, memory_depth=depth, **kw)
    x = torch.randn(1, 16384, 64)
    t0 = time.time()
    with torch.no_grad():
        y, st = layer(x)
    r = lambda t: t.pow(2).mean().sqrt().item()
    wn = [w.norm().item() for w in st.memory.weights]
    print(depth, f"first {r(y[:, :1024]):.3g} last {r(y[:, -1024:]):.3g} ratio {r(y[:, -1024:])/r(y[:, :1024]):.3f}",
          "W", [f"{a:.3g}" for a in wn], "W0", [f"{w.norm().item():.3g}" for w in layer.memory], f"{time.time()-t0:.1f}s", flush=True)
