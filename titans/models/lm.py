"""TitansLM: token embedding, a stack of blocks, final norm, LM head; streaming and generation.

Shape legend
    B batch, T tokens in this call, V vocabulary, dim model width
    input_ids, labels: [B, T]   logits: [B, T, V]
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import NeuralMemory, NeuralMemoryState, RMSNorm
from .blocks import Block
from .config import TitansConfig

if TYPE_CHECKING:
    from .decode import Decoder

__all__ = ["TitansLM", "LMOutput", "ModelState"]


@dataclass
class ModelState:
    """The streaming state of a whole model: one entry per block, keyed by the block's name.
    batch_size and shape (what the state's tensors depend on in the model's config) let the
    model refuse a state made for another batch or another architecture."""
    layers: dict[str, Any]
    position: int
    batch_size: int | None = None
    shape: str | None = None

    def detach(self) -> "ModelState":
        return ModelState({k: (v.detach() if v is not None else None) for k, v in self.layers.items()},
                          self.position, self.batch_size, self.shape)

    def memories(self) -> dict[str, NeuralMemoryState]:
        """The neural memory's state in every block that has one and has started, by block name
        (an LMM block's state is one; MAC, MAG and MAL keep it as their `.memory`)."""
        out = {}
        for name, s in self.layers.items():
            s = s if isinstance(s, NeuralMemoryState) else getattr(s, "memory", None)
            if isinstance(s, NeuralMemoryState):
                out[name] = s
        return out


@dataclass
class LMOutput:
    """What TitansLM.forward returns, always: logits [B, T, V], loss (None without labels), state."""
    logits: Tensor
    loss: Tensor | None
    state: ModelState


class TitansLM(nn.Module):
    """A causal language model built from TitansConfig.

    out = model(input_ids, state=None, labels=None): labels are the targets of each position
    (already shifted: labels[:, t] is the token that follows input_ids[:, t]; -100 is ignored),
    and loss is their mean cross-entropy. Passing out.state to the next call continues the
    sequence exactly as one longer call would.

    Sharing follows the Hugging Face convention (models/hub.py, the layout of
    `huggingface_hub.PyTorchModelHubMixin`): `model.save_pretrained(dir)` writes config.json,
    model.safetensors and a model card (README.md), `push_to_hub(repo)` uploads them, and
    `TitansLM.from_pretrained(x)` loads a saved directory, a hub repository
    id, or a training run (its newest good checkpoint) or checkpoint directory alike. Loading
    reads JSON and safetensors only (never a pickle) and is strict: a missing or corrupt file,
    or weights that do not fit the config, is a ValueError naming it.
    """

    def __init__(self, config: TitansConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(Block(kind, config) for kind in config.layer_kinds)
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        c = config  # what a state's tensors depend on: a state made for another architecture is refused
        self._state_shape = (f"layers {','.join(c.layer_kinds)}, dim {c.dim}, heads {c.heads}, memory "
                             f"{c.mem_heads}x{c.mem_head_dim} depth {c.memory_depth}, window {c.window}, "
                             f"segment {c.segment_len}, persistent {c.n_persistent}")
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        self.init_weights()

    def init_weights(self) -> None:
        """All initialisation in one place (docs/models.md).

        Linear and embedding weights ~ N(0, init_std^2); the projections that write into the
        residual stream (each mixer's and MLP's last linear) are scaled down by sqrt(2 n_layers)
        so the stream's variance does not grow with depth (GPT-2); norms start at 1. The neural
        memory's own parameters (initial memory W_0, gate biases, convolution) keep the
        documented initialisation of NeuralMemory.reset_memory_parameters. With
        config.memory_fan_in_init the memory's q, k, v projection is N(0, 1/dim) instead: AdamW's
        first steps move every weight by about lr whatever its gradient, which at init_std 0.02
        unties the tied q and k within a few steps without warmup or at lr 1e-2 (docs/models.md).
        """
        std = self.config.init_std
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for name, p in self.named_parameters():
            if name.endswith(("wo.weight", "mlp.w_out.weight")):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.config.n_layers))
        for module in self.modules():
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            if isinstance(module, NeuralMemory):
                if self.config.memory_fan_in_init:
                    nn.init.normal_(module.wqkv.weight, std=module.wqkv.in_features ** -0.5)
                module.reset_memory_parameters()   # after: it ties q to the (re-drawn) k

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, force_download: bool = False,
                        local_files_only: bool = False, token: str | bool | None = None,
                        map_location: str = "cpu") -> "TitansLM":
        """A saved directory, a hub repository id ("owner/name"), a training run (its newest
        good checkpoint) or a checkpoint directory, in eval mode."""
        from safetensors import SafetensorError
        from safetensors.torch import load_model

        from .hub import resolve_pretrained
        path = Path(pretrained_model_name_or_path)
        if path.is_dir():
            from ..train.checkpoint import load_run_checkpoint  # a training run or one of its checkpoints
            ckpt = load_run_checkpoint(path)
            if ckpt is not None:
                return cls.from_checkpoint(ckpt)
        config, weights = resolve_pretrained(pretrained_model_name_or_path, revision=revision, cache_dir=cache_dir,
                                             force_download=force_download, local_files_only=local_files_only,
                                             token=token)
        model = cls(TitansConfig.from_dict(config))
        try:
            load_model(model, weights, strict=True, device=map_location)
        except (SafetensorError, OSError, RuntimeError) as e:
            first = (str(e).strip().splitlines() or [""])[0]
            raise ValueError(f"{weights!r} is corrupt or does not fit config.json: {first}") from None
        return model.eval()

    def save_pretrained(self, save_directory: str | os.PathLike, *, model_card: str | None = None) -> Path:
        """Write config.json, model.safetensors and README.md (`model_card`, default a card that
        says what the model is and nothing it cannot know) to save_directory."""
        from .hub import save_pretrained
        return save_pretrained(self, save_directory, model_card)

    def push_to_hub(self, repo_id: str, *, commit_message: str = "Upload a titans model", private: bool | None = None,
                    token: str | None = None, model_card: str | None = None) -> str:
        """Upload the saved model to the hub repository `repo_id` (created if needed); its URL."""
        from .hub import push_to_hub
        return push_to_hub(self, repo_id, commit_message=commit_message, private=private, token=token,
                           card=model_card)

    @classmethod
    def from_checkpoint(cls, ckpt: Any) -> "TitansLM":
        """The model of a loaded training checkpoint (`titans.train.Checkpoint`), in eval mode."""
        if ckpt.config is None:
            raise ValueError(f"checkpoint {str(ckpt.path)!r} has no config.json")
        model = cls(TitansConfig.from_dict(ckpt.config))
        model.load_state_dict(ckpt.model_state)
        return model.eval()

    def init_state(self, batch_size: int) -> ModelState:
        return ModelState({f"blocks.{i}": b.init_state(batch_size) for i, b in enumerate(self.blocks)}, 0,
                          batch_size, self._state_shape)

    def forward(self, input_ids: Tensor, state: ModelState | None = None, labels: Tensor | None = None) -> LMOutput:
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int):
            raise ValueError(f"input_ids must be an integer tensor [B, T], got "
                             f"{tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__}")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise ValueError(f"input_ids must lie in [0, vocab_size={self.config.vocab_size})")
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
        if labels is not None and (labels.dtype.is_floating_point or labels.dtype.is_complex
                                   or labels.dtype == torch.bool):
            raise ValueError(f"labels must be an integer tensor of token ids (-100: ignored), got {labels.dtype}")
        if labels is not None and labels.numel():
            bad = (labels != -100) & ((labels < 0) | (labels >= self.config.vocab_size))
            if bool(bad.any()):
                raise ValueError(f"labels must lie in [0, vocab_size={self.config.vocab_size}) or be -100, got "
                                 f"{int(labels[bad][0])}")
        if labels is not None and labels.numel() and bool((labels == -100).all()):
            raise ValueError("labels: every position is -100 (ignored), so there is nothing to score")
        B, T = input_ids.shape
        if state is None:
            state = self.init_state(B)
        else:
            self._check_state(state)
        if state.batch_size not in (None, B):
            raise ValueError(f"state holds a batch of {state.batch_size} sequences, input_ids has {B}")
        x = self.embed(input_ids)
        new_layers = {}
        for i, block in enumerate(self.blocks):
            key = f"blocks.{i}"
            x, new_layers[key] = block(x, state.layers[key])
        logits = self.head(self.norm(x)).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(B * T, -1), labels.reshape(B * T).long(), ignore_index=-100)
        return LMOutput(logits=logits, loss=loss, state=ModelState(new_layers, state.position + T, B, self._state_shape))

    @torch.no_grad()
    def generate_stream(self, input_ids: Tensor, max_new_tokens: int, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None, state: ModelState | None = None,
                        generator: torch.Generator | None = None) -> Iterator[Tensor]:
        """Yield the next token ids [B], one at a time: a parallel prefill (the chunked forward),
        then the one-token decode step (`decoder`) for every new token.

        Memory does not grow with the tokens seen (for every block kind but full attention,
        whose key/value cache is the point of it). temperature 0 is greedy decoding.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a tensor [B, T] (one prompt: ids[None]), got "
                             f"{tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__}")
        if input_ids.shape[1] == 0:
            raise ValueError("generate needs at least one prompt token")
        out = self(input_ids, state=state)
        logits = out.logits[:, -1]
        decoder = self.decoder(out.state) if max_new_tokens > 1 else None
        for i in range(max_new_tokens):
            token = sample(logits, temperature, top_k, top_p, generator)
            yield token
            if i + 1 < max_new_tokens:   # the last token's logits are never used
                logits = decoder.step(token)

    def _check_state(self, state: Any) -> None:
        """A ModelState of this model's blocks and architecture, or a ValueError saying which not."""
        if not isinstance(state, ModelState) or set(state.layers) != {f"blocks.{i}" for i in range(len(self.blocks))}:
            raise ValueError("state must be a ModelState from this model (one entry per block)")
        if state.shape not in (None, self._state_shape):
            raise ValueError(f"state was made by another architecture ({state.shape}) than this model's "
                             f"({self._state_shape})")

    def decoder(self, state: ModelState) -> "Decoder":
        """The one-token decode step from `state` (titans.models.decode.Decoder): logits [B, V] =
        decoder.step(tokens [B]), decoder.state() the ModelState so far. state must come from a
        forward of at least one token (the prefill), on this model."""
        from .decode import Decoder
        self._check_state(state)
        if state.position < 1 or state.batch_size is None:
            raise ValueError("decoding continues a prefill: run the prompt (at least one token) through the model "
                             "first and pass its out.state")
        return Decoder(self, state)

    def generate(self, input_ids: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, state: ModelState | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """The prompt followed by max_new_tokens sampled tokens, [B, T + max_new_tokens]."""
        new = list(self.generate_stream(input_ids, max_new_tokens, temperature, top_k, top_p, state, generator))
        return torch.cat([input_ids] + [t[:, None] for t in new], dim=1)


def sample(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> Tensor:
    """One token per row of logits [B, V]: greedy at temperature 0, else top-k / nucleus sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already cover top_p
        drop = probs.cumsum(-1) - probs > top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
