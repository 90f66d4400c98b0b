"""TitansConfig: one flat dataclass for every variant, named presets, safe JSON/YAML/TOML I/O."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..typed import check_fields

__all__ = ["TitansConfig", "VARIANTS", "BLOCK_KINDS", "PRESETS"]

# block kinds a layer can be; a variant is a default pattern of them
BLOCK_KINDS = ("lmm", "mac", "mag", "mal", "attn", "swa")
VARIANTS = {"lmm": "lmm", "mac": "mac", "mag": "mag", "mal": "mal", "transformer": "attn", "swa": "swa"}


@dataclass
class TitansConfig:
    """Everything that defines a model. See docs/models.md for each field's meaning and default.

    block_pattern: the kind of each layer (one of BLOCK_KINDS); None means the variant's own
    kind in every layer. A pattern shorter than n_layers repeats, so ("swa", "mag") alternates.
    """

    variant: str = "lmm"
    vocab_size: int = 256
    dim: int = 256
    n_layers: int = 4
    heads: int = 4
    head_dim: int | None = None            # default dim // heads
    mlp_hidden: int | None = None          # SwiGLU width; default 8/3 dim rounded up to 64
    block_pattern: tuple[str, ...] | None = None
    # neural memory (docs/design.md §1-2; ablations of §4)
    memory_heads: int | None = None        # default heads
    memory_head_dim: int | None = None     # default head_dim
    memory_depth: int = 1
    memory_expansion: int = 4
    chunk_size: int = 16
    memory_activation: str = "silu"
    memory_residual: bool = False
    conv: bool = True
    conv_kernel: int = 4
    momentum: bool = False
    forgetting: bool = True
    gate_mode: str = "token"
    max_lr: float = 0.5
    momentum_form: str = "bounded"        # "bounded": S = eta S - (1 - eta) theta u; "plain": paper eq. 10
    normalize_step: bool = True            # theta scaled per token by the memory's gradient (memory_rule)
    qk_silu: bool = False                  # SiLU on the memory's q and k before their L2 norm (the paper: True)
    key_shift: bool = True                 # the keys' conv starts on the previous token (NeuralMemory)
    qk_tied_init: bool = True              # the memory's query projection starts equal to its key projection
    theta_init: float = 0.8                # initial theta as a fraction of max_lr
    alpha_init: tuple[float, float] = (1e-4, 3e-3)  # initial forget rates, spread over the memory heads
    forget_to_init: bool = False           # forgetting decays the memory toward W_0, not zero (linear memory)
    # attention and persistent memory (docs/design.md §2-3)
    window: int = 256                      # sliding window w (swa, mag, mal)
    segment_len: int = 128                 # MAC segment length C, a multiple of chunk_size
    n_persistent: int = 16                 # N_p (mac, mag, mal)
    mac_write: str = "x"                   # what MAC writes into its memory: "x" (its input), "residual" (x + y), "y" (eq. 24)
    mal_residual: bool = True              # MAL: the memory is a residual layer (x + LMM(x)); False: eq. 31 literally
    rope_base: float = 10000.0
    qk_norm: bool = False
    # embeddings and init
    tie_embeddings: bool = True
    norm_eps: float = 1e-6
    init_std: float = 0.02
    memory_fan_in_init: bool = True        # the memory's q, k, v projection ~ N(0, 1/dim), not N(0, init_std^2)

    def __post_init__(self) -> None:
        check_fields(self)  # every field to its annotated type: text from --set is parsed, lists become tuples
        self.validate()

    # -- derived values --------------------------------------------------------------------
    @property
    def layer_kinds(self) -> tuple[str, ...]:
        pattern = self.block_pattern or (VARIANTS[self.variant],)
        return tuple(pattern[i % len(pattern)] for i in range(self.n_layers))

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.heads

    @property
    def mem_heads(self) -> int:
        return self.memory_heads if self.memory_heads is not None else self.heads

    @property
    def mem_head_dim(self) -> int:
        return self.memory_head_dim if self.memory_head_dim is not None else self.attn_head_dim

    @property
    def hidden(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        return -(-int(8 * self.dim / 3) // 64) * 64

    # -- checks ----------------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"TitansConfig: {msg}")

        def positive_int(name: str) -> None:
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{name} must be an integer >= 1, got {v!r}")

        need(self.variant in VARIANTS, f"variant must be one of {sorted(VARIANTS)}, got {self.variant!r}")
        for name in ("vocab_size", "dim", "n_layers", "heads", "memory_depth", "memory_expansion",
                     "chunk_size", "conv_kernel", "window", "segment_len"):
            positive_int(name)
        for name in ("head_dim", "mlp_hidden", "memory_heads", "memory_head_dim"):
            if getattr(self, name) is not None:
                positive_int(name)
        need(self.head_dim is not None or self.dim % self.heads == 0,
             f"dim={self.dim} must be divisible by heads={self.heads} (or set head_dim)")
        need(self.attn_head_dim % 2 == 0, f"the attention head dim must be even (RoPE), got {self.attn_head_dim}")
        need(isinstance(self.n_persistent, int) and self.n_persistent >= 0,
             f"n_persistent must be an integer >= 0, got {self.n_persistent!r}")
        need(self.segment_len % self.chunk_size == 0,
             f"segment_len={self.segment_len} must be a multiple of chunk_size={self.chunk_size} (MAC)")
        need(self.gate_mode in ("token", "chunk"), f"gate_mode must be 'token' or 'chunk', got {self.gate_mode!r}")
        need(self.memory_activation in ("silu", "gelu", "tanh"),
             f"memory_activation must be silu, gelu or tanh, got {self.memory_activation!r}")
        need(self.mac_write in ("y", "residual", "x"), f"mac_write must be 'y', 'residual' or 'x', got {self.mac_write!r}")
        need(self.momentum_form in ("bounded", "plain"),
             f"momentum_form must be 'bounded' or 'plain', got {self.momentum_form!r}")
        for name in ("max_lr", "rope_base", "norm_eps", "init_std"):
            need(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)!r}")
        need(0 < self.theta_init < 1, f"theta_init must lie in (0, 1), got {self.theta_init!r}")
        need(isinstance(self.alpha_init, tuple) and len(self.alpha_init) == 2
             and 0 < self.alpha_init[0] <= self.alpha_init[1] < 1,
             f"alpha_init must be [low, high] with 0 < low <= high < 1, got {self.alpha_init!r}")
        need(not self.forget_to_init or self.memory_depth == 1,
             f"forget_to_init needs a linear memory (memory_depth=1), got memory_depth={self.memory_depth}")
        if self.block_pattern is not None:
            need(len(self.block_pattern) >= 1, "block_pattern must not be empty")
            bad = [k for k in self.block_pattern if k not in BLOCK_KINDS]
            need(not bad, f"block_pattern kinds must be in {BLOCK_KINDS}, got {bad}")

    # -- presets and I/O -------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, variant: str = "lmm", **overrides: Any) -> "TitansConfig":
        """A named preset (see PRESETS) for a variant, with field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
        values = dict(PRESETS[name])
        values.update(PRESET_VARIANT_OVERRIDES.get((name, variant), {}))
        values.update(variant=variant, **overrides)
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["block_pattern"] is not None:
            d["block_pattern"] = list(d["block_pattern"])
        d["alpha_init"] = list(d["alpha_init"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TitansConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TitansConfig: unknown field(s) {unknown}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        """Write as .json, .yaml/.yml or .toml (by extension)."""
        path = Path(path)
        d = self.to_dict()
        if path.suffix == ".json":
            path.write_text(json.dumps(d, indent=2) + "\n")
        elif path.suffix in (".yaml", ".yml"):
            import yaml
            path.write_text(yaml.safe_dump(d, sort_keys=False))
        else:
            raise ValueError(f"config files are .json or .yaml/.yml (writing), got {path.name!r}")

    @classmethod
    def load(cls, path: str | Path) -> "TitansConfig":
        """Read a .json, .yaml/.yml or .toml file (safe loaders only; nothing is executed)."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file not found: {path}")
        text = path.read_text()
        try:
            if path.suffix == ".json":
                d = json.loads(text)
            elif path.suffix in (".yaml", ".yml"):
                import yaml
                d = yaml.safe_load(text)
            elif path.suffix == ".toml":
                import tomllib
                d = tomllib.loads(text)
            else:
                raise ValueError(f"config files are .json, .yaml/.yml or .toml, got {path.name!r}")
        except (json.JSONDecodeError, ValueError) as e:
            raise ValueError(f"cannot parse config {path}: {e}") from None
        except Exception as e:  # yaml errors have their own classes
            raise ValueError(f"cannot parse config {path}: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"config {path} must hold a mapping of fields")
        return cls.from_dict(d)


# Presets. The paper (section 5.1) gives only parameter counts; the shapes below are our choice
# (docs/models.md). tiny runs in CPU seconds, small in CPU minutes. The paper sizes use the
# LLaMA-2 32K vocabulary; each variant gets the depth that lands its parameter count nearest the
# name (tests/models/test_presets.py holds them within 5%).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=256, dim=64, n_layers=2, heads=2, chunk_size=16, window=32, segment_len=32,
                 n_persistent=4),
    "small": dict(vocab_size=256, dim=256, n_layers=4, heads=4, chunk_size=16, window=128, segment_len=128,
                  n_persistent=8),
}
_PAPER = dict(vocab_size=32000, chunk_size=16, segment_len=512, window=1024, n_persistent=16)
_PAPER_SHAPES = {"170M": dict(dim=768, heads=12), "340M": dict(dim=1024, heads=16),
                 "400M": dict(dim=1024, heads=16), "760M": dict(dim=1536, heads=16)}
# layers per (size, variant): mac, mag and mal blocks hold attention and memory, so they are fewer
_PAPER_LAYERS = {
    "170M": dict(lmm=18, mac=13, mag=13, mal=14, transformer=21, swa=21),
    "340M": dict(lmm=22, mac=16, mag=16, mal=17, transformer=24, swa=24),
    "400M": dict(lmm=26, mac=19, mag=19, mal=20, transformer=29, swa=29),
    "760M": dict(lmm=22, mac=16, mag=16, mal=17, transformer=25, swa=25),
}
PRESET_VARIANT_OVERRIDES: dict[tuple[str, str], dict[str, Any]] = {}
for _size, _shape in _PAPER_SHAPES.items():
    PRESETS[_size] = dict(_PAPER, **_shape, n_layers=_PAPER_LAYERS[_size]["lmm"])
    for _variant, _layers in _PAPER_LAYERS[_size].items():
        PRESET_VARIANT_OVERRIDES[(_size, _variant)] = dict(n_layers=_layers)
