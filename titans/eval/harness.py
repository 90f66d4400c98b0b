"""An lm-evaluation-harness adapter: score a Titans model on the harness's tasks (the paper's
Table 1: PIQA, HellaSwag, WinoGrande, ARC-e/c, SIQA, BoolQ, LAMBADA) with the harness's own
prompts and metrics. Needs the `harness` extra (`pip install 'titans-lm[harness]'`).

    titans eval harness --model runs/x --tasks piqa,hellaswag        # machines that reach the data
    lm_eval --model titans --model_args pretrained=runs/x ...         # after `import titans.eval.harness`

The model is registered with the harness as "titans". Inputs of any length are scored whole:
they go through the model `piece` tokens at a time with the recurrent state carried across
(`titans.eval.stream.token_logprobs`), never truncated to a window. A text scored on its own
starts after the document separator (`titans.data.tokens.document_separator`), the token
every training document followed; context and continuation are tokenized separately, so the
continuation's tokens are exactly its own.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from typing import Any

import torch

from ..data.tokens import document_separator
from .stream import prefill, token_logprobs

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # the optional extra is missing
    raise ImportError("the lm-evaluation-harness adapter needs lm-eval: pip install 'titans-lm[harness]'") from e

__all__ = ["TitansHarnessLM"]


@register_model("titans")
class TitansHarnessLM(LM):
    """lm-eval's LM interface over a TitansLM.

    Args:
        pretrained: a run directory, checkpoint directory, saved model directory or hub id
            (anything `titans eval` takes as --model), or a (model, tokenizer) pair.
        piece: tokens per forward call; longer inputs carry the state across pieces.
        max_gen_toks: the default generation budget of generate_until.
        progress: a tqdm bar per request list on stderr (only when stderr is a terminal, and
            not when lm-eval passes disable_tqdm).
    """

    def __init__(self, pretrained: Any, piece: int = 2048, max_gen_toks: int = 256, progress: bool = True,
                 **_: Any) -> None:
        super().__init__()
        if isinstance(pretrained, tuple):
            self.model, self.tokenizer = pretrained
        else:
            from ..cli.common import load_run
            self.model, self.tokenizer, _ = load_run(pretrained)
        self.model.eval()
        self.piece, self.max_gen_toks, self.progress = int(piece), int(max_gen_toks), progress
        self.prefix = document_separator(self.tokenizer)

    @property
    def prefix_token_id(self) -> int:
        return self.prefix[-1]

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def _bar(self, total: int, disable_tqdm: bool, what: str) -> Any:
        from tqdm import tqdm
        return tqdm(total=total, unit="request", desc=what, file=sys.stderr, dynamic_ncols=True, leave=False,
                    disable=disable_tqdm or not self.progress or not sys.stderr.isatty())

    def _iter(self, requests: list[Any], disable_tqdm: bool, what: str) -> Any:
        with self._bar(len(requests), disable_tqdm, what) as bar:
            for r in requests:
                yield r
                bar.update(1)

    # ------------------------------------------------------------------------ scoring
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether greedy decoding gives the continuation) per
        request. Requests that share a context (every multiple-choice question) run the context
        once and score each continuation from its state."""
        by_context: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            by_context[r.args[0]].append(i)
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        with self._bar(len(requests), disable_tqdm, "loglikelihood") as bar:
            for context, indices in by_context.items():
                self._score_context(requests, context, indices, out)
                bar.update(len(indices))
        return out  # type: ignore[return-value]

    def _score_context(self, requests: list[Any], context: str, indices: list[int],
                       out: list[tuple[float, bool] | None]) -> None:
        """Score the continuations of one context, each from the context's state, into out."""
        ids = self.prefix + self._encode(context)
        state, last = prefill(self.model, torch.tensor([ids]), piece=self.piece)
        for i in indices:
            cont = self._encode(requests[i].args[1])
            if not cont:
                out[i] = (0.0, True)
                continue
            logp, greedy, _ = token_logprobs(self.model, torch.tensor(cont), self.piece, state, last[0])
            out[i] = (logp.double().sum().item(), bool((greedy == torch.tensor(cont)).all()))


    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """log p(text) of each whole text, after the document separator: the sum that
        `titans eval ppl --text` turns into a perplexity."""
        scores = []
        for r in self._iter(requests, disable_tqdm, "loglikelihood_rolling"):
            ids = self.prefix + self._encode(r.args[0])
            logp, _, _ = token_logprobs(self.model, torch.tensor(ids), self.piece)
            scores.append(logp.double().sum().item())
        return scores

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each context until one of `until` appears or max_gen_toks."""
        results = []
        for r in self._iter(requests, disable_tqdm, "generate_until"):
            context, kwargs = r.args[0], dict(r.args[1] if len(r.args) > 1 else {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            budget = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            state, logits = prefill(self.model, torch.tensor([self.prefix + self._encode(context)]), piece=self.piece)
            ids: list[int] = []
            text = ""
            for _ in range(budget):
                token = int(logits[0].argmax())
                ids.append(token)
                text = self.tokenizer.decode(ids)
                if any(u and u in text for u in until):
                    break
                step = self.model(torch.tensor([[token]]), state=state)
                state, logits = step.state, step.logits[:, -1]
            for u in until:  # the stop string and what follows it are not part of the answer
                if u and u in text:
                    text = text[:text.index(u)]
            results.append(text)
        return results
