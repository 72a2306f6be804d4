"""MultimodalLM: splicing, routes, option scoring, greedy generation with the KV cache."""
from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from torch import nn

from workbench.mllm import MultimodalLM, kv_cache_argument
from workbench.routing import RoutedModule
from workbench.world.tokenizer import build_tokenizer
from workbench.world.training import new_llm


class ConstTower(nn.Module):
    """Maps an input [k] to k tokens whose embedding is the input value times a fixed vector."""

    def __init__(self, hidden: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.v = nn.Parameter(torch.randn(hidden, generator=g))

    def forward(self, x):
        return x.float().unsqueeze(-1) * self.v


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    tok = build_tokenizer()
    llm = new_llm(tok, 32, 2, 2, 64, seed=0).eval()
    return MultimodalLM(llm, tok, {"image": ConstTower(32, 1), "audio": ConstTower(32, 2)})


def test_embed_splices_in_prompt_order(model):
    tok = model.tokenizer
    prompt = "audio: <audio>\nimage: <image>\nwhat is in the input?"
    mi = {"image": [torch.tensor([1.0, 2.0, 3.0])], "audio": [torch.tensor([5.0, 6.0])]}
    emb, mask, routes = model.embed([prompt], [mi])
    n_text = len(tok(prompt)["input_ids"]) - 2
    assert emb.shape == (1, n_text + 3 + 2, 32) and int(mask.sum()) == n_text + 5
    r = routes[0].tolist()
    # <s> audio : [2 audio tokens] image : [3 image tokens] ...
    assert r[:3] == [0, 0, 0] and r[3:5] == [2, 2] and r[5:7] == [0, 0] and r[7:10] == [1, 1, 1]
    assert torch.allclose(emb[0, 3], 5.0 * model.towers["audio"].v)
    assert torch.allclose(emb[0, 9], 3.0 * model.towers["image"].v)
    text_emb = model.llm.get_input_embeddings()(torch.tensor(tok(prompt)["input_ids"]))
    assert torch.allclose(emb[0, :3], text_emb[:3])
    model.route_order = ["audio", "image"]
    try:
        _, _, routes2 = model.embed([prompt], [mi])
        assert routes2[0, 3].item() == 1 and routes2[0, 7].item() == 2
    finally:
        model.route_order = ["image", "audio"]


def test_placeholder_input_mismatch_raises(model):
    with pytest.raises(ValueError):
        model.embed(["image: <image> <image>"], [{"image": [torch.ones(2)]}])
    with pytest.raises(ValueError):
        model.embed(["image: <image>"], [{"image": [torch.ones(2), torch.ones(2)]}])


def test_score_options_matches_manual_loglik(model):
    prompt, mi = "image: <image>\nwhich of these is in the input?\nanswer:", {"image": [torch.ones(2)]}
    options = ["A", "cat drum", "B"]
    got = model.score_options(prompt, mi, options)
    for o, g in zip(options, got):
        emb, mask, _ = model.embed([prompt], [mi])
        ids = model.tokenizer(" " + o, add_special_tokens=False)["input_ids"]
        full = torch.cat([emb[0], model.llm.get_input_embeddings()(torch.tensor(ids))])[None]
        with torch.no_grad():
            logp = torch.log_softmax(model.llm(inputs_embeds=full).logits[0], -1)
        T = emb.shape[1]
        manual = sum(float(logp[T - 1 + i, t]) for i, t in enumerate(ids))
        assert abs(manual - float(g)) < 1e-4


def test_forward_masks_prompt(model):
    out = model(["image: <image>\nwhat is in the input?\nanswer:"], [{"image": [torch.ones(3)]}], ["cat"])
    assert torch.isfinite(out.loss)
    # the loss equals -mean log p of the answer tokens (" cat" and </s>)
    sc = model.score_options("image: <image>\nwhat is in the input?\nanswer:", {"image": [torch.ones(3)]}, ["cat"])
    emb, _, _ = model.embed(["image: <image>\nwhat is in the input?\nanswer:"], [{"image": [torch.ones(3)]}])
    cat = model.tokenizer.convert_tokens_to_ids("cat")
    full = torch.cat([emb[0], model.llm.get_input_embeddings()(torch.tensor([cat]))])[None]
    with torch.no_grad():
        lp_eos = torch.log_softmax(model.llm(inputs_embeds=full).logits[0, -1], -1)[model.tokenizer.eos_token_id]
    assert abs(float(out.loss.detach()) - (-(float(sc[0]) + float(lp_eos)) / 2)) < 1e-4


def test_length_buckets_give_the_same_loss_and_gradients(model):
    """Bucketed training forward (sequences sorted by length, each group padded to its own longest,
    losses weighted by the batch's answer-token count) = the one-batch mean over answer tokens."""
    prompts = ["image: <image>\nwhat is in the input?\nanswer:", "w3 w4",
               "audio: <audio> <audio> w5 w6 w7 w8 w9\nanswer:", "w10", "image: <image> w11"]
    inputs = [{"image": [torch.ones(3)]}, {}, {"audio": [torch.ones(2), torch.ones(5)]}, {}, {"image": [torch.ones(7)]}]
    answers = ["cat", "w12 w13 w14", "dog", "w15 w16", "w17"]
    params = [p for p in model.parameters()]
    grads = {}
    for k in (1, 2, 3, 5, 9):
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = model(prompts, inputs, answers, length_buckets=k).loss
            loss.backward()
        grads[k] = (loss.detach(), [p.grad.clone() if p.grad is not None else None for p in params])
    model.zero_grad(set_to_none=True)
    ref_loss, ref_grads = grads[1]
    for k in (2, 3, 5, 9):
        loss, g = grads[k]
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        for a, b in zip(g, ref_grads):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # a real change of the objective is visible: dropping one sequence changes the loss
    other = model(prompts[:-1], inputs[:-1], answers[:-1], length_buckets=3).loss.detach()
    assert abs(float(other) - float(ref_loss)) > 1e-4


def test_generate_batch_equals_single_and_manual_greedy(model):
    prompts = ["image: <image>\nwhat is in the input?\nanswer:",
               "audio: <audio>\nimage: <image>\nwhich comes first? A. cat B. drum C. eagle D. flute\nanswer:"]
    mis = [{"image": [torch.ones(2)]}, {"image": [torch.ones(4)], "audio": [torch.full((3,), 0.5)]}]
    batch = model.generate_batch(prompts, mis, max_new_tokens=5)
    singles = [model.generate(p, m, max_new_tokens=5) for p, m in zip(prompts, mis)]
    assert batch == singles
    # manual greedy without cache
    emb, _, _ = model.embed([prompts[1]], [mis[1]])
    toks = []
    with torch.no_grad():
        for _ in range(5):
            nxt = int(model.llm(inputs_embeds=emb).logits[0, -1].argmax())
            if nxt == model.tokenizer.eos_token_id:
                break
            toks.append(nxt)
            emb = torch.cat([emb, model.llm.get_input_embeddings()(torch.tensor([[nxt]]))], 1)
    assert singles[1] == model.tokenizer.decode(toks, skip_special_tokens=True).strip()


def test_kv_cache_goes_by_the_llms_own_keyword(model):
    """The KV cache is passed to and read from the LLM under the name its forward takes (``cache`` in
    transformers 5, ``past_key_values`` in 4.x): no deprecation warning on the decode path (a wrong name
    would be swallowed by ``**kwargs`` and decode without the prompt - the greedy test above catches that)."""
    kw = kv_cache_argument(model.llm)
    assert kw in inspect.signature(type(model.llm).forward).parameters

    class Transformers4Style(nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            return input_ids

    assert kv_cache_argument(Transformers4Style()) == "past_key_values"
    prompts = ["image: <image>\nwhich comes first? A. cat B. drum\nanswer:"] * 2
    mis = [{"image": [torch.ones(2)]}, {"image": [torch.ones(3)]}]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values", category=FutureWarning)
        texts = model.generate_batch(prompts, mis, max_new_tokens=3)
        model.score_and_generate_batch(prompts, mis, [["cat", "drum horn"]] * 2, max_new_tokens=3)
    assert len(texts) == 2


class Spy(RoutedModule):
    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(None if self.route_ids is None else self.route_ids.clone())
        return x


def test_routes_visible_to_routed_modules(model):
    spy = Spy()
    model.llm.model.layers[0].add_module("spy", spy)
    def hook(module, args, kwargs):
        spy(None)

    handle = model.llm.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model.generate("image: <image>\nwhat is in the input?\nanswer:", {"image": [torch.ones(2)]}, max_new_tokens=3)
    finally:
        handle.remove()
        del model.llm.model.layers[0].spy
    assert spy.seen[0] is not None and spy.seen[0].shape[1] > 5 and int(spy.seen[0].max()) == 1
    assert all(s is not None and s.shape[1] == 1 and int(s.sum()) == 0 for s in spy.seen[1:])
    assert spy.route_ids is None  # restored after the call


def test_answer_logits_are_the_forward_loss_positions(model):
    """The rows of answer_logits are the positions forward's loss is taken on: their cross-entropy with
    the answer tokens (+ </s>) is forward's loss, for a batch of uneven lengths."""
    prompts = ["image: <image>\nwhat is in the input?\nanswer:", "w3 w4", "audio: <audio> w5 w6\nanswer:"]
    inputs = [{"image": [torch.ones(3)]}, {}, {"audio": [torch.ones(2)]}]
    answers = ["cat", "w12 w13 w14", "dog"]
    tok = model.tokenizer
    targets = torch.tensor([t for a in answers for t in tok(" " + a, add_special_tokens=False)["input_ids"]
                            + [tok.eos_token_id]])
    with torch.no_grad():
        logits = model.answer_logits(prompts, inputs, answers)
        loss = model(prompts, inputs, answers).loss
    assert logits.shape == (len(targets), model.llm.config.vocab_size)
    torch.testing.assert_close(torch.nn.functional.cross_entropy(logits, targets), loss, rtol=1e-5, atol=1e-6)
