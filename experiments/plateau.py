"""The half-way plateau of the recall study, broken down: train one model exactly as
experiments/recall.py does (tiny preset, MQAR 4 pairs spread over 128 tokens, batch 16, AdamW
3e-3, same seed), then on 8 x 32 held-out sequences print the accuracy per pair index and what
the wrong answers are (another pair's value, a key, another value).

    python experiments/plateau.py lmm 0 4000
"""
import shutil, sys, tempfile, collections
import torch
import titans  # noqa
from titans import TitansConfig, TitansLM
from titans.data.tasks import recall_batches, mqar_batch
from titans.train import TrainConfig, Trainer
variant, seed, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(seed)
config = TitansConfig.from_preset("tiny", variant=variant)
model = TitansLM(config)
out = tempfile.mkdtemp()
cfg = TrainConfig(steps=steps, batch_size=16, seq_len=128, lr=3e-3, warmup=steps // 10, eval_every=0, eval_batches=2,
                  ckpt_every=0, keep_last=1, out_dir=out, progress=False, seed=seed)
Trainer(model, recall_batches("mqar", 16, 256, seed=seed, seq_len=128, n_pairs=4, power_a=1.0), None, cfg,
        config_dict=config.to_dict()).fit()
shutil.rmtree(out)
model.eval()
by_pair = collections.Counter(); tot_pair = collections.Counter(); which_val = collections.Counter()
with torch.no_grad():
    for step in range(8):
        x, y = mqar_batch(32, 128, 4, 256, seed=1000 + seed, step=step, power_a=1.0)
        pred = model(x).logits.argmax(-1)
        for b, t in (y != -100).nonzero().tolist():
            keys = x[b, 0:8:2].tolist(); vals = x[b, 1:8:2].tolist()
            i = keys.index(x[b, t].item())
            tot_pair[i] += 1; ok = pred[b, t].item() == y[b, t].item(); by_pair[i] += ok
            p = pred[b, t].item()
            which_val["right" if ok else (f"value of pair {vals.index(p)}" if p in vals else ("a key" if p < 128 else "other value"))] += 1
print({i: round(by_pair[i] / tot_pair[i], 3) for i in range(4)}, dict(which_val), flush=True)
