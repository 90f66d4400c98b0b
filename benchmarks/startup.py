"""Start-up time of the `titans` command (issue 31): `--help` must not import torch, and
`titans generate` must print its first token within 0.5 s of torch's own import time.

    python benchmarks/startup.py [--runs 5]

Each case runs in a fresh process, `--runs` times; the table gives the median wall time. The
generate case times from the process start to the first byte of the first generated token on
stdout (the prompt is printed first), for a tiny untrained model saved to a temporary directory
(the time to load and run a model this size is start-up, not compute). A benchmark, not a test:
the numbers depend on the machine and its load, so run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "ROMEO:"


def _wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def _first_token(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    seen = b""
    while len(seen) <= len(PROMPT):  # the prompt, then the first generated character
        chunk = proc.stdout.read1(64)
        if not chunk:
            raise SystemExit(f"{' '.join(cmd)} printed no token")
        seen += chunk
    elapsed = time.perf_counter() - t0
    proc.kill()
    proc.wait()
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    a = p.parse_args()
    py = sys.executable
    titans = [py, "-m", "titans"]
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "tiny"
        subprocess.run([py, "-c", "import torch; from titans import TitansConfig, TitansLM; torch.manual_seed(0); "
                        f"TitansLM(TitansConfig.from_preset('tiny', variant='mac')).save_pretrained({str(model)!r})"],
                       check=True)
        cases = [
            ("python -c 'import torch'", lambda: _wall([py, "-c", "import torch"])),
            ("titans --help", lambda: _wall([*titans, "--help"])),
            ("titans train --help", lambda: _wall([*titans, "train", "--help"])),
            ("titans eval stream --help", lambda: _wall([*titans, "eval", "stream", "--help"])),
            ("titans generate: first token", lambda: _first_token([*titans, "generate", "--model", str(model),
                                                                  "--prompt", PROMPT, "--max-new-tokens", "50"])),
        ]
        env_note = f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {a.runs} runs, median"
        print(f"{'case':34s} {'seconds':>8}   ({env_note})")
        medians = {}
        for name, run in cases:
            medians[name] = statistics.median(run() for _ in range(a.runs))
            print(f"{name:34s} {medians[name]:8.2f}")
    over = medians["titans generate: first token"] - medians["python -c 'import torch'"]
    print(f"generate's first token comes {over:.2f} s after torch's import time (target: at most 0.5 s); "
          f"--help {medians['titans --help']:.2f} s (target: under 0.5 s)")


if __name__ == "__main__":
    main()
