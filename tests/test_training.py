"""Training pieces of the miniature world: the capability experts' preservation term."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from workbench.mllm import MultimodalLM
from workbench.world.tasks import Example, batches
from workbench.world.tokenizer import build_tokenizer
from workbench.world.training import PreservingLoss, new_llm


class Tower(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.v = nn.Parameter(torch.randn(hidden, generator=torch.Generator().manual_seed(1)))

    def forward(self, x):
        return torch.as_tensor(x).float().unsqueeze(-1) * self.v


def _vlm(seed: int) -> MultimodalLM:
    tok = build_tokenizer()
    return MultimodalLM(new_llm(tok, 32, 2, 2, 64, seed=seed), tok, {"image": Tower(32)})


def _other_task(rng: np.random.Generator) -> Example:
    return Example("image: <image>\nwhat is in the input?\nanswer:", "cat dog",
                   [("image", rng.standard_normal(3).astype(np.float32))], "other")


OWN = (["image: <image>\nwhich of these is in the input?\nanswer:"], [{"image": [torch.ones(2)]}], ["cat"])


@pytest.fixture()
def pair():
    torch.manual_seed(0)
    return _vlm(0), _vlm(1)


def test_weight_zero_is_the_model_and_draws_nothing(pair):
    model, ref = pair
    drawn = []

    def stream():
        while True:
            drawn.append(1)
            yield [_other_task(np.random.default_rng(0))]
    p = PreservingLoss(model, ref, stream(), 0.0)
    torch.testing.assert_close(p(*OWN).loss, model(*OWN).loss)
    assert not drawn


def test_kl_is_zero_against_itself_and_positive_against_another_model(pair):
    model, other = pair
    same = PreservingLoss(model, copy.deepcopy(model), batches(_other_task, 4, 0), 1.0)
    torch.testing.assert_close(same(*OWN).loss, model(*OWN).loss, rtol=1e-5, atol=1e-6)
    diff = PreservingLoss(model, other, batches(_other_task, 4, 0), 2.0)
    with torch.no_grad():
        extra = float(diff(*OWN).loss - model(*OWN).loss)
    # the closed form: 2 x KL(other || model) on the answer positions of the same batch
    batch = next(batches(_other_task, 4, 0))
    args = ([e.prompt for e in batch], [{"image": [torch.as_tensor(e.inputs[0][1])]} for e in batch],
            [e.answer for e in batch])
    with torch.no_grad():
        lp_ref = torch.log_softmax(other.answer_logits(*args), -1)
        lp = torch.log_softmax(model.answer_logits(*args), -1)
    kl = float((lp_ref.exp() * (lp_ref - lp)).sum(-1).mean())
    assert kl > 1e-3 and extra == pytest.approx(2 * kl, rel=1e-4)


def test_only_the_model_is_trained(pair):
    model, ref = pair
    p = PreservingLoss(model, ref, batches(_other_task, 4, 0), 1.0)
    assert {id(q) for q in p.parameters()} == {id(q) for q in model.parameters()}
    p(*OWN).loss.backward()
    assert all(q.grad is None for q in ref.parameters())
    assert any(q.grad is not None and float(q.grad.abs().sum()) > 0 for q in model.llm.parameters())
