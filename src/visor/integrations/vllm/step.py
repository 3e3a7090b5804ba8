"""What one forward call of the served model holds, read from vLLM's attention metadata: which requests prefill and
which decode, where each one's tokens sit in the flat token tensor, and where its images sit in its prompt.

vLLM hands the model one flat tensor of the step's decoder (text) tokens, request after request, plus the image
features of the prompts it prefills (the encoder outputs). Everything the layer kinds need to tell rows apart is
derived here once per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ImageSlot:
    """One image of a prompt: how many text tokens precede it, and its image arguments (what positions need)."""

    offset: int
    inputs: dict


def tag(features: torch.Tensor, slot: ImageSlot) -> torch.Tensor:
    """Image features carrying where their image sits. vLLM passes each image's encoder output to the model's
    forward as the very tensor `embed_multimodal` returned (it must be 2-D), so the slot travels as an attribute."""
    features.visor_slot = slot
    return features


@dataclass
class Step:
    starts: torch.Tensor  # (R + 1,) each request's first token in the flat tensor
    lengths: torch.Tensor  # (R,) its tokens in this step
    cached: torch.Tensor  # (R,) its tokens before this step (0: a prefill)
    visual: torch.Tensor  # (R,) its visual tokens (the encoder length)
    text_block_table: torch.Tensor  # (R, blocks) of the first text layer's cache group (names requests)

    @classmethod
    def read(cls, text_metadata, visual_lengths: torch.Tensor) -> Step:
        starts = text_metadata.query_start_loc.cpu().long()
        lengths = starts[1:] - starts[:-1]
        cached = text_metadata.seq_lens.cpu().long()[: len(lengths)] - lengths
        return cls(starts, lengths, cached, visual_lengths[: len(lengths)].long(),
                   text_metadata.block_table[: len(lengths)])

    @property
    def requests(self) -> int:
        return len(self.lengths)

    @property
    def prefill(self) -> torch.Tensor:
        return (self.cached == 0).nonzero().squeeze(1)

    @property
    def decode(self) -> torch.Tensor:
        return (self.cached > 0).nonzero().squeeze(1)

    def tokens(self, request: int) -> slice:
        return slice(int(self.starts[request]), int(self.starts[request + 1]))

    def check(self) -> None:
        if bool((self.lengths[self.decode] != 1).any()):
            raise ValueError("VISOR decodes one token per request and step (no speculative decoding)")
