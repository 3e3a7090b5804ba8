"""The CPE: zero at the start, a local depth-wise convolution once trained, applied to each image on its own."""

from __future__ import annotations

import pytest
import torch

from visor import VisorForConditionalGeneration
from visor.modeling.position_encoding import ConditionalPositionEncoding


def randomised(kernel: int = 7, hidden: int = 16, seed: int = 0) -> ConditionalPositionEncoding:
    torch.manual_seed(seed)
    encoding = ConditionalPositionEncoding(hidden, kernel)
    with torch.no_grad():
        encoding.conv.weight.normal_()
        encoding.conv.bias.normal_()
    return encoding


def test_starts_as_the_identity():
    encoding = ConditionalPositionEncoding(16)
    tokens = torch.randn(30, 16)
    assert torch.equal(encoding(tokens), tokens)


@pytest.mark.parametrize("kernel", [1, 3, 7])
def test_reaches_only_kernel_neighbours(kernel):
    encoding = randomised(kernel)
    tokens = torch.randn(20, 16)
    changed = tokens.clone()
    changed[10] += 1.0
    with torch.no_grad():
        moved = (encoding(changed) - encoding(tokens)).abs().amax(dim=1) > 0
    half = kernel // 2
    assert moved.nonzero().squeeze(1).tolist() == list(range(10 - half, 10 + half + 1))


def test_is_depthwise():
    """Channel c of the output depends on channel c of the input only."""
    encoding = randomised()
    tokens = torch.randn(12, 16)
    changed = tokens.clone()
    changed[:, 3] += 1.0
    with torch.no_grad():
        moved = (encoding(changed) - encoding(tokens)).abs().amax(dim=0) > 0
    assert moved.nonzero().squeeze(1).tolist() == [3]


def test_keeps_the_shape_and_the_residual():
    encoding = randomised()
    tokens = torch.randn(9, 16)
    with torch.no_grad():
        output = encoding(tokens)
        expected = tokens + encoding.conv(tokens.T[None])[0].T
    assert output.shape == tokens.shape
    assert torch.equal(output, expected)


def test_model_applies_it_per_image_and_not_to_text(stock_factory):
    """Two images in one sample: the second image's embeddings do not depend on the first image's pixels."""
    stock = stock_factory("tiny", num_layers=2)
    model = VisorForConditionalGeneration.from_stock(stock).eval()
    with torch.no_grad():
        model.position_encoding.conv.weight.normal_()
    image_token, tokens_per_crop = 3, 64 + 1  # a single 64-token crop plus its newline
    input_ids = torch.tensor([[1, 9] + [image_token] * tokens_per_crop + [9] + [image_token] * tokens_per_crop + [9]])
    pixel_values = torch.randn(2, 1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    image_sizes = torch.tensor([[64, 64], [64, 64]])
    two_images = torch.tensor([2])
    other = pixel_values.clone()
    other[0] += 1.0
    with torch.no_grad():
        first, mask, _ = model.embed_multimodal(input_ids, pixel_values=pixel_values, image_sizes=image_sizes,
                                             batch_num_images=two_images)
        second, _, _ = model.embed_multimodal(input_ids, pixel_values=other, image_sizes=image_sizes,
                                           batch_num_images=two_images)
    first_image = mask[0].nonzero().squeeze(1)[:tokens_per_crop]
    second_image = mask[0].nonzero().squeeze(1)[tokens_per_crop:]
    assert not torch.equal(first[0, first_image], second[0, first_image])
    assert torch.equal(first[0, second_image], second[0, second_image])
    text = ~mask[0]
    assert torch.equal(first[0, text], model.get_input_embeddings()(input_ids)[0, text])
