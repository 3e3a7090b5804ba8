"""Where tokens sit in each sample, and the masks that follow from their original order.

Every layer loop of the project runs stock decoder layers on a *subset* of each sample's tokens: VISOR keeps a
visual stream and a text stream, in-LLM pruning keeps the tokens that survived so far. `Slots` is such a subset,
compacted to the left of a padded (batch, N) tensor, remembering each slot's position in the original (B, S)
sequence; masks come from those positions (`Slots.sees`: causality in the original order, padding, and which
visual tokens a text token may read), so compacting never changes what a token may attend to. `TokenLayout` is
the pair of streams, with the split and merge SA layers need to run over [visual; text] exactly as the stock
model does. Everything is batched gathers and scatters; nothing loops over samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Slots:
    """Some positions of a (B, S) sequence per sample, in their original order, left-aligned in (B, N) slots."""

    index: torch.Tensor  # (B, N) position in the sequence; S for an empty slot
    valid: torch.Tensor  # (B, N) the slot holds a real token (not padding, not empty)
    length: int  # S

    @classmethod
    def of(cls, selected: torch.Tensor, valid: torch.Tensor) -> Slots:
        """The positions where `selected` (B, S) holds; a slot is valid where `valid` (B, S) holds."""
        batch, length = selected.shape
        count = selected.sum(dim=1)
        width = int(count.max()) if batch else 0
        positions = torch.arange(length, device=selected.device).expand(batch, length)
        # Selected positions keep their index; the rest sort to the end (key S), preserving the original order.
        keys = torch.where(selected, positions, torch.full_like(positions, length))
        index = keys.sort(dim=1, stable=True).values[:, :width]
        filled = torch.arange(width, device=selected.device)[None, :] < count[:, None]
        return cls(index, filled & torch.nn.functional.pad(valid, (0, 1)).gather(1, index), length)

    @property
    def width(self) -> int:
        return self.index.shape[1]

    def select(self, rows: torch.Tensor) -> Slots:
        """The slots of a subset of samples (rows: 1-D index tensor)."""
        return type(self)(**{name: value[rows] if isinstance(value, torch.Tensor) else value
                             for name, value in vars(self).items()})

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """values (B, S, ...) at each slot's position (zeros for empty slots)."""
        if self.index.numel() and int(self.index.max()) >= values.shape[1]:  # only then is a zero column needed
            values = torch.nn.functional.pad(values, [0, 0] * (values.dim() - 2) + [0, 1])
        index = self.index.view(*self.index.shape, *[1] * (values.dim() - 2)).expand(*self.index.shape, *values.shape[2:])
        return values.gather(1, index)

    def sees(self, keys: Slots) -> torch.Tensor:
        """(B, N, K) may-attend: a key at an earlier or the same original position, holding a real token."""
        return (keys.index[:, None, :] <= self.index[:, :, None]) & keys.valid[:, None, :]

    def causal_mask(self) -> torch.Tensor:
        """(B, N, N) these slots attending to each other causally; every slot sees itself, so rows of padding
        never become all-masked (their outputs are unused)."""
        return _keep_diagonal(self.sees(self))


@dataclass
class TokenLayout:
    """The visual and the text stream of a (B, S) sequence, and the padding mask of the whole sequence."""

    visual: Slots
    text: Slots
    token_valid: torch.Tensor  # (B, S) not padding

    @classmethod
    def build(cls, visual_mask: torch.Tensor, attention_mask: torch.Tensor | None) -> TokenLayout:
        """`visual_mask` (B, S): the visual tokens; `attention_mask`: the usual padding mask (1 = real token)."""
        token_valid = torch.ones_like(visual_mask) if attention_mask is None else attention_mask.bool()
        return cls(Slots.of(visual_mask, token_valid), Slots.of(~visual_mask, token_valid), token_valid)

    @property
    def length(self) -> int:
        return self.token_valid.shape[1]

    def select(self, rows: torch.Tensor) -> TokenLayout:
        """The layout of a subset of samples (rows: 1-D index tensor)."""
        return TokenLayout(self.visual.select(rows), self.text.select(rows), self.token_valid[rows])

    def split(self, sequence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, ...) → visual (B, Nv, ...), text (B, Nt, ...); rotary (cos, sin) split the same way."""
        return self.visual.gather(sequence), self.text.gather(sequence)

    def merge(self, visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Inverse of `split`: put both streams back in the original token order."""
        batch, _, *rest = text.shape
        # Every position is written once unless some slot is empty (index S, a dummy column dropped below).
        complete = self.visual.index.numel() + self.text.index.numel() == batch * self.length
        merged = text.new_empty(batch, self.length + 1, *rest) if complete else text.new_zeros(batch, self.length + 1, *rest)
        for stream, slots in ((visual, self.visual), (text, self.text)):
            index = slots.index.view(*slots.index.shape, *([1] * len(rest))).expand(*slots.index.shape, *rest)
            merged.scatter_(1, index, stream)
        return merged[:, : self.length]

    # ---- masks (True = may attend) -----------------------------------------------------------------------
    def full_mask(self) -> torch.Tensor:
        """(B, S, S) causal + padding mask for SA layers over the whole sequence, as in the stock model."""
        positions = torch.arange(self.length, device=self.token_valid.device).expand_as(self.token_valid)
        return Slots(positions, self.token_valid, self.length).causal_mask()

    def text_mask(self) -> torch.Tensor:
        """(B, Nt, Nt) causal + padding mask among text tokens."""
        return self.text.causal_mask()

    def cross_mask(self) -> torch.Tensor:
        """(B, Nt, Nv): a text token reads the visual tokens that came before it in the prompt."""
        return self.text.sees(self.visual)


def _keep_diagonal(mask: torch.Tensor) -> torch.Tensor:
    size = min(mask.shape[-2:])
    eye = torch.zeros(mask.shape[-2:], dtype=torch.bool, device=mask.device)
    eye[range(size), range(size)] = True
    return mask | eye


def attention_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, Q, K) bool → (B, 1, Q, K) additive bias, the form both eager and SDPA attention accept."""
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    bias.masked_fill_(~allowed, torch.finfo(dtype).min)
    return bias[:, None]
