"""Where visual and text tokens sit in each sample, and the masks and positions that follow from it.

VISOR keeps two streams: visual tokens V and text tokens T, each compacted to the left of a padded
(batch, max_count, d) tensor. `TokenLayout` knows, for every compact slot, the token's index in the original
sequence, so it can split a full sequence into streams and merge them back in the original order (SA layers
run on the merged sequence exactly as the stock model does), and derive every attention mask from the
original order: causality, padding, and which visual tokens a text token may read in a CA layer.
Everything is batched gathers and scatters; nothing loops over samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _compact_index(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For a (B, S) bool mask, the (B, N) original indices of the selected tokens (left-aligned) and validity.

    Empty slots point at index S, a dummy column that `TokenLayout` adds when gathering and drops on merge.
    """
    batch, length = selected.shape
    count = selected.sum(dim=1)
    width = int(count.max()) if batch else 0
    positions = torch.arange(length, device=selected.device).expand(batch, length)
    # Selected tokens keep their index; the rest sort to the end (key S), preserving the original order.
    keys = torch.where(selected, positions, torch.full_like(positions, length))
    index = keys.sort(dim=1, stable=True).values[:, :width]
    valid = torch.arange(width, device=selected.device)[None, :] < count[:, None]
    return index, valid


@dataclass
class TokenLayout:
    """Index maps between a (B, S) sequence and its compact visual and text streams.

    `attention_mask` is the usual (B, S) padding mask (1 = real token).
    """

    length: int
    text_index: torch.Tensor  # (B, Nt) original index of each text slot (S for an empty slot)
    text_valid: torch.Tensor  # (B, Nt) slot holds a real, non-padding token
    visual_index: torch.Tensor  # (B, Nv)
    visual_valid: torch.Tensor  # (B, Nv)
    token_valid: torch.Tensor  # (B, S) not padding

    @classmethod
    def build(cls, visual_mask: torch.Tensor, attention_mask: torch.Tensor | None) -> "TokenLayout":
        if attention_mask is None:
            attention_mask = torch.ones_like(visual_mask)
        token_valid = attention_mask.bool()
        text_index, text_slot = _compact_index(~visual_mask)
        visual_index, visual_slot = _compact_index(visual_mask)
        padded_valid = torch.nn.functional.pad(token_valid, (0, 1))
        return cls(
            length=visual_mask.shape[1],
            text_index=text_index,
            text_valid=text_slot & padded_valid.gather(1, text_index),
            visual_index=visual_index,
            visual_valid=visual_slot & padded_valid.gather(1, visual_index),
            token_valid=token_valid,
        )

    @property
    def num_visual(self) -> int:
        return self.visual_index.shape[1]

    def select(self, rows: torch.Tensor) -> "TokenLayout":
        """The layout of a subset of samples (rows: 1-D index tensor)."""
        return TokenLayout(
            length=self.length,
            text_index=self.text_index[rows],
            text_valid=self.text_valid[rows],
            visual_index=self.visual_index[rows],
            visual_valid=self.visual_valid[rows],
            token_valid=self.token_valid[rows],
        )

    # ---- moving tensors between the full sequence and the two streams ------------------------------------
    @staticmethod
    def _gather(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """values (B, S, ...) gathered at index (B, N) with index S meaning a zero dummy slot."""
        if index.numel() and int(index.max()) >= values.shape[1]:  # only then is the zero slot needed
            values = torch.nn.functional.pad(values, [0, 0] * (values.dim() - 2) + [0, 1])
        expanded = index.view(*index.shape, *([1] * (values.dim() - 2))).expand(*index.shape, *values.shape[2:])
        return values.gather(1, expanded)

    def split(self, sequence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, ...) → visual (B, Nv, ...), text (B, Nt, ...)."""
        return self._gather(sequence, self.visual_index), self._gather(sequence, self.text_index)

    def text(self, sequence: torch.Tensor) -> torch.Tensor:
        return self._gather(sequence, self.text_index)

    def merge(self, visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Inverse of `split`: put both streams back in the original token order."""
        batch, _, *rest = text.shape
        # Every position is written once unless some slot is empty (index S, a dummy column dropped below).
        complete = self.visual_index.numel() + self.text_index.numel() == batch * self.length
        merged = text.new_empty(batch, self.length + 1, *rest) if complete else text.new_zeros(batch, self.length + 1, *rest)
        for stream, index in ((visual, self.visual_index), (text, self.text_index)):
            expanded = index.view(*index.shape, *([1] * len(rest))).expand(*index.shape, *rest)
            merged.scatter_(1, expanded, stream)
        return merged[:, : self.length]

    # ---- masks (True = may attend) -----------------------------------------------------------------------
    def full_mask(self) -> torch.Tensor:
        """(B, S, S) causal + padding mask for SA layers over the whole sequence, as in the stock model."""
        order = torch.arange(self.length, device=self.token_valid.device)
        causal = order[None, :, None] >= order[None, None, :]
        return _keep_diagonal(causal & self.token_valid[:, None, :])

    def text_mask(self) -> torch.Tensor:
        """(B, Nt, Nt) causal + padding mask among text tokens (compaction preserves order)."""
        width = self.text_index.shape[1]
        order = torch.arange(width, device=self.text_index.device)
        causal = order[None, :, None] >= order[None, None, :]
        return _keep_diagonal(causal & self.text_valid[:, None, :])

    def cross_mask(self) -> torch.Tensor:
        """(B, Nt, Nv): a text token reads the visual tokens that came before it in the prompt."""
        before = self.visual_index[:, None, :] < self.text_index[:, :, None]
        return before & self.visual_valid[:, None, :]


def _keep_diagonal(mask: torch.Tensor) -> torch.Tensor:
    """Let every query see itself, so padding rows never become all-masked (their outputs are unused)."""
    size = min(mask.shape[-2:])
    eye = torch.zeros(mask.shape[-2:], dtype=torch.bool, device=mask.device)
    eye[range(size), range(size)] = True
    return mask | eye


def attention_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, Q, K) bool → (B, 1, Q, K) additive bias, the form both eager and SDPA attention accept."""
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    bias.masked_fill_(~allowed, torch.finfo(dtype).min)
    return bias[:, None]
