"""Saving and loading a TitansLM the Hugging Face way, without importing huggingface_hub until the
hub itself is used.

A saved model is a directory with config.json (the TitansConfig as JSON), model.safetensors (the
weights) and README.md (a model card). The same layout on the hub is a model repository, so
`from_pretrained` takes either. We write this ourselves instead of inheriting
huggingface_hub.PyTorchModelHubMixin: importing the mixin costs about 0.7 s, which every
`titans generate` paid before its first token, and its model card claimed the model "has been
pushed to the Hub" even for a local save.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "CARD_FILE", "save_pretrained", "resolve_pretrained", "push_to_hub",
           "default_card"]

CONFIG_FILE, WEIGHTS_FILE, CARD_FILE = "config.json", "model.safetensors", "README.md"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # 'name' or 'owner/name'


def default_card(model: Any, body: str | None = None) -> str:
    """A model card: the hub's metadata header, then `body` (default: what the model is)."""
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    if body is None:
        body = (f"# Titans {c.variant}\n\nA `titans` language model (Titans: Learning to Memorize at Test Time, "
                f"arXiv 2501.00663): variant `{c.variant}`, {n:,} parameters, {c.n_layers} layers of width "
                f"{c.dim}, vocabulary {c.vocab_size}. Saved with `TitansLM.save_pretrained`; nothing here says how "
                f"or whether it was trained.\n\n"
                f"    from titans import TitansLM\n    model = TitansLM.from_pretrained(\"<this directory>\")\n")
    return f"---\nlibrary_name: titans\ntags:\n- titans\n- test-time-memory\n---\n\n{body}"


def save_pretrained(model: Any, directory: str | os.PathLike, card: str | None = None) -> Path:
    """Write config.json, model.safetensors and README.md (the card; default `default_card`)."""
    from safetensors.torch import save_model

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2, sort_keys=True) + "\n")
    save_model(model, str(out / WEIGHTS_FILE))  # tied weights are stored once
    (out / CARD_FILE).write_text(card if card is not None else default_card(model))
    return out


def resolve_pretrained(name: str | os.PathLike, *, revision: str | None = None,
                       cache_dir: str | os.PathLike | None = None, force_download: bool = False,
                       local_files_only: bool = False, token: str | bool | None = None) -> tuple[dict, str]:
    """(config dict, weights path) of a saved directory or a hub repository id; every failure
    is one line naming the file or the id."""
    path = Path(name)
    if path.is_dir():
        config_file, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
        if not config_file.is_file():
            raise ValueError(f"{str(path)!r} has no config.json: not a saved TitansLM (save_pretrained writes one)")
        if not weights.is_file():
            raise ValueError(f"{str(weights)!r} is missing")
    else:
        text = str(name)
        if path.exists():
            raise ValueError(f"{text!r} is a file: give the directory that holds config.json and model.safetensors")
        if not _HUB_ID.fullmatch(text):  # the hub's own error would be about the form of a repo id
            raise FileNotFoundError(f"{text!r}: no such directory (and not a hub repository id 'owner/name')")
        from huggingface_hub import hf_hub_download
        try:
            config_file, weights = (Path(hf_hub_download(text, f, revision=revision, cache_dir=cache_dir,
                                                         force_download=force_download,
                                                         local_files_only=local_files_only, token=token))
                                    for f in (CONFIG_FILE, WEIGHTS_FILE))
        except OSError as e:  # the hub's not-found, offline and HTTP errors
            first = (str(e).strip().splitlines() or [""])[0]
            raise FileNotFoundError(f"{text!r}: no such directory, and the hub has no such model or cannot be "
                                    f"reached ({type(e).__name__}: {first})") from None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(config_file)!r} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{str(config_file)!r} does not hold a config (a JSON object)")
    return config, str(weights)


def push_to_hub(model: Any, repo_id: str, *, commit_message: str = "Upload a titans model", private: bool | None = None,
                token: str | None = None, card: str | None = None) -> str:
    """Create (or reuse) the hub repository `repo_id` and upload the saved model; its URL."""
    import tempfile

    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, exist_ok=True, private=private)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp, card)
        return str(api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message))
