"""Per-token routed linear layers: checked against separately materialised models and a brute-force
per-token reference (every route's full output computed, then selected token by token)."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from workbench.errors import ConfigError
from workbench.mllm import kv_cache_argument
from workbench.io.packing import pack_mask
from workbench.routing import (Dense, LowRank, Masked, RoutedLinear, add_dense_routes, add_lora_routes, apply_routes,
                               linear_names, load_route_adapter, materialize_route, remove_routes,
                               route_parameters, routed_modules, save_route_adapter, storage_bytes, token_routes)

torch.set_num_threads(1)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llm(seed=0, hidden=32, ffn=64, vocab=50):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def _linear_shapes(llm):
    return {n: (m.out_features, m.in_features) for n, m in llm.named_modules()
            if isinstance(m, nn.Linear) and n.split(".")[-1] in TARGETS}


def random_routes(llm, seed=1, n_routes=3):
    """Route 0: dense; route 1: LoRA; route 2: masked over a shared tau* + a second LoRA (a sum).
    Returns (route_deltas for apply_routes, {route: {module: dense delta}} computed independently)."""
    g = torch.Generator().manual_seed(seed)
    specs, dense = {k: {} for k in range(n_routes)}, {k: {} for k in range(n_routes)}
    for name, (o, i) in _linear_shapes(llm).items():
        tau = 0.05 * torch.randn(o, i, generator=g)
        specs[0][name] = Dense(tau)
        dense[0][name] = tau.clone()
        A, B = torch.randn(3, i, generator=g), 0.05 * torch.randn(o, 3, generator=g)
        specs[1][name + ".weight"] = LowRank(A, B, 0.7)
        dense[1][name] = 0.7 * B @ A
        if n_routes > 2:
            mask = torch.rand(o, i, generator=g) < 0.3
            A2, B2 = torch.randn(2, i, generator=g), 0.05 * torch.randn(o, 2, generator=g)
            specs[2][name] = [Masked(tau, pack_mask(mask), 1.5), LowRank(A2, B2, 2.0)]
            dense[2][name] = 1.5 * mask.float() * tau + 2.0 * B2 @ A2
    return specs, dense


def materialised(llm, deltas_k):
    """A separate plain copy of ``llm`` with W0 + delta loaded into it."""
    ref = copy.deepcopy(llm)
    sd = ref.state_dict()
    for name, d in deltas_k.items():
        sd[name + ".weight"] = sd[name + ".weight"] + d
    ref.load_state_dict(sd)
    return ref


class BruteForceLinear(nn.Module):
    """y = sum_k M_k * f_k(x): every route's full output, selected per token (methods.md section 2)."""

    def __init__(self, weight, bias, deltas, holder):
        super().__init__()
        self.weight, self.bias, self.deltas, self.holder = weight, bias, deltas, holder

    def forward(self, x):
        rid = self.holder["rid"]
        out = F.linear(x, self.weight, self.bias)
        if rid is None or rid.shape != x.shape[:-1]:
            rid = torch.zeros(x.shape[:-1], dtype=torch.long)
        res = torch.zeros_like(out)
        for k in range(int(rid.max()) + 1):
            f_k = F.linear(x, self.weight + self.deltas.get(k, torch.zeros_like(self.weight)), self.bias)
            res = res + (rid == k).unsqueeze(-1) * f_k
        return res


def brute_force_model(llm, dense):
    ref = copy.deepcopy(llm)
    holder = {"rid": None}
    for name in _linear_shapes(llm):
        parent = ref.get_submodule(name.rsplit(".", 1)[0])
        lin = getattr(parent, name.rsplit(".", 1)[1])
        per = {k: dense[k][name] for k in dense if name in dense[k]}
        setattr(parent, name.rsplit(".", 1)[1], BruteForceLinear(lin.weight, lin.bias, per, holder))
    return ref, holder


# ----------------------------------------------------------------------------------------------------------------
def test_routed_linear_per_token_equals_materialised_weight():
    torch.manual_seed(0)
    lin = nn.Linear(12, 9)
    g = torch.Generator().manual_seed(3)
    tau = torch.randn(9, 12, generator=g)
    mask = torch.rand(9, 12, generator=g) < 0.5
    A, B = torch.randn(4, 12, generator=g), torch.randn(9, 4, generator=g)
    rl = RoutedLinear(lin)
    rl.set_route(0, Dense(tau, 0.5))
    rl.set_route(1, LowRank(A, B, 0.25))
    rl.set_route(2, Masked(tau, mask, 2.0))
    W = {0: lin.weight + 0.5 * tau, 1: lin.weight + 0.25 * B @ A, 2: lin.weight + 2.0 * mask * tau,
         3: lin.weight.detach()}  # route 3 has no delta: the base weight
    x = torch.randn(2, 6, 12, generator=g)
    rid = torch.tensor([[0, 1, 2, 3, 1, 0], [2, 2, 0, 1, 3, 3]])
    with token_routes(rl, rid):
        y = rl(x)
    for b in range(2):
        for t in range(6):
            want = F.linear(x[b, t], W[int(rid[b, t])], lin.bias)
            torch.testing.assert_close(y[b, t], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("route", [0, 1, 2])
def test_all_tokens_on_one_route_equal_separate_materialised_model(route):
    llm = tiny_llm()
    specs, dense = random_routes(llm)
    ref = materialised(llm, dense[route])
    routed = copy.deepcopy(llm)
    apply_routes(routed, specs, target_modules=TARGETS)
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), token_routes(routed, torch.full((2, 9), route)):
        got = routed(input_ids=ids).logits
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        base = llm(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (got - base).abs().max() > 1e-3  # the deltas matter


def routed_and_reference(llm):
    """``llm`` with random routes applied (a deep copy) and its brute-force reference:
    ``(routed, specs, dense, reference, holder)``."""
    specs, dense = random_routes(llm)
    routed = copy.deepcopy(llm)
    apply_routes(routed, specs)
    ref, holder = brute_force_model(llm, dense)
    return routed, specs, dense, ref, holder


def test_mixed_routes_equal_brute_force_reference():
    llm = tiny_llm()
    routed, specs, dense, ref, holder = routed_and_reference(llm)
    ids = torch.randint(0, 50, (3, 10), generator=torch.Generator().manual_seed(6))
    rid = torch.randint(0, 3, (3, 10), generator=torch.Generator().manual_seed(7))
    holder["rid"] = rid
    with torch.no_grad(), token_routes(routed, rid):
        got = routed(input_ids=ids).logits
    with torch.no_grad():
        want = ref(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_empty_route_does_not_zero_the_others():
    """The trap: a route with no tokens in the batch must leave the other routes' outputs intact."""
    llm = tiny_llm()
    routed, specs, dense, ref, holder = routed_and_reference(llm)
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(8))
    rid = torch.tensor([[0, 0, 2, 2, 2, 0, 0, 0], [0, 2, 2, 0, 0, 0, 0, 0]])  # route 1 absent
    holder["rid"] = rid
    with torch.no_grad(), token_routes(routed, rid):
        got = routed(input_ids=ids).logits
    with torch.no_grad():
        want = ref(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # module level: tokens of a present route get exactly W0 + delta, none are zeroed
    rl = routed.get_submodule("model.layers.0.self_attn.q_proj")
    x = torch.randn(1, 4, 32)
    with token_routes(rl, torch.tensor([[2, 2, 2, 2]])):
        y = rl(x)
    torch.testing.assert_close(y, F.linear(x, rl.weight + dense[2]["model.layers.0.self_attn.q_proj"]),
                               rtol=1e-5, atol=1e-5)


def test_decode_step_uses_text_route():
    llm = tiny_llm()
    routed, specs, dense, ref_bf, holder = routed_and_reference(llm)
    ref_text = materialised(llm, dense[0])
    ids = torch.randint(0, 50, (1, 7), generator=torch.Generator().manual_seed(9))
    nxt = torch.tensor([[11]])
    rid = torch.tensor([[0, 1, 1, 2, 2, 0, 0]])
    holder["rid"] = rid
    kv = kv_cache_argument(llm)  # `cache` (transformers 5) or `past_key_values` (4.x)
    with torch.no_grad():
        # routed: the prompt's route ids stay set during the decode step (length 1 != 7)
        with token_routes(routed, rid):
            out = routed(input_ids=ids, use_cache=True)
            step = routed(input_ids=nxt, use_cache=True, **{kv: out[kv]}).logits
        # reference: the same prompt cache (brute force), then a decode step with route 0 everywhere
        out_ref = ref_bf(input_ids=ids, use_cache=True)
        step_ref = ref_text(input_ids=nxt, use_cache=True, **{kv: out_ref[kv]}).logits
    torch.testing.assert_close(step, step_ref, rtol=1e-4, atol=1e-5)
    holder["rid"] = torch.cat([rid, torch.zeros(1, 1, dtype=torch.long)], 1)
    with torch.no_grad():
        full = ref_bf(input_ids=torch.cat([ids, nxt], 1)).logits[:, -1]
    torch.testing.assert_close(step[:, -1], full, rtol=1e-4, atol=1e-5)


def test_memory_no_full_weight_copy_per_route():
    """MMER-style: route 0 = tau*, routes 1..4 = masks over the same tau*: the model holds the base,
    one tau* per module and 1 bit per entry per route - not one full weight per route."""
    llm = tiny_llm(hidden=64, ffn=128)
    base_bytes = storage_bytes(llm)
    shapes = _linear_shapes(llm)
    g = torch.Generator().manual_seed(0)
    taus = {n: torch.randn(*s, generator=g) for n, s in shapes.items()}
    specs = {0: {n: Dense(t) for n, t in taus.items()}}
    for k in range(1, 5):
        specs[k] = {n: Masked(t, torch.rand(t.shape, generator=g) < 0.5, 1.0) for n, t in taus.items()}
    apply_routes(llm, specs)
    n_entries = sum(t.numel() for t in taus.values())
    extra = storage_bytes(llm) - base_bytes
    assert extra == n_entries * 4 + 4 * sum((t.numel() + 7) // 8 for t in taus.values())
    assert extra < 1.2 * n_entries * 4  # far below 5 full float32 copies (5 * 4 bytes per entry)
    for m in routed_modules(llm).values():
        assert m._n_shared == 1
        assert all(b.dtype in (torch.float32, torch.uint8) for b in m.buffers())
        assert sum(p.numel() for p in m.parameters()) == m.weight.numel() + (0 if m.bias is None else m.bias.numel())


def test_add_lora_routes_identity_at_init_and_trains_only_route_params():
    llm = tiny_llm()
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = llm(input_ids=ids).logits
    names = add_lora_routes(llm, n_routes=2, r=4, alpha=8, target_modules=TARGETS)
    assert len(names) == 2 * 7
    rid = torch.tensor([[0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    with torch.no_grad(), token_routes(llm, rid):
        torch.testing.assert_close(llm(input_ids=ids).logits, before)
    p0, p1 = route_parameters(llm, 0), route_parameters(llm, 1)
    assert len(p0) == len(p1) == 2 * 14 and not {id(p) for p in p0} & {id(p) for p in p1}
    trainable = {id(p) for p in llm.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in p0 + p1}
    # gradient reaches only routes that have tokens: no route-1 tokens -> no route-1 gradient
    with token_routes(llm, torch.zeros(2, 6, dtype=torch.long)):
        llm(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in p1)
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in p0)
    for p in llm.parameters():
        p.grad = None
    opt = torch.optim.SGD(p0 + p1, lr=0.5)
    base_before = {n: p.detach().clone() for n, p in llm.named_parameters() if not p.requires_grad}
    for _ in range(3):
        with token_routes(llm, rid):
            loss = llm(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, p in llm.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base_before[n]), n
    assert any(float(p.detach().abs().sum()) > 0 for p in p1 if p.shape[1] == 4)  # some B of route 1 moved


def test_add_dense_routes_trainable_full_delta():
    llm = tiny_llm()
    add_dense_routes(llm, 2, target_modules=["q_proj"])
    ps = route_parameters(llm, 1)
    assert len(ps) == 2 and all(p.shape == (32, 32) and p.requires_grad for p in ps)


def test_route_adapter_roundtrip_and_peft_equivalence(tmp_path):
    from peft import PeftModel

    llm = tiny_llm()
    add_lora_routes(llm, 2, r=4, alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], seed=3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in route_parameters(llm, 1):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    folder = save_route_adapter(llm, 1, tmp_path / "ad")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 16
    loaded = load_route_adapter(folder)
    for name, m in routed_modules(llm).items():
        torch.testing.assert_close(loaded[name].dense(), m.route_delta(1))
    # independent: peft's own loader on a plain copy of the base gives the same logits as route 1
    plain = remove_routes(copy.deepcopy(llm))
    for p in plain.parameters():
        p.requires_grad_(False)
    peft_model = PeftModel.from_pretrained(plain, folder).eval()
    ids = torch.randint(0, 50, (1, 6), generator=g)
    with torch.no_grad(), token_routes(llm, torch.ones(1, 6, dtype=torch.long)):
        got = llm(input_ids=ids).logits
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_materialize_and_remove_routes():
    llm = tiny_llm()
    specs, dense = random_routes(llm)
    routed = copy.deepcopy(llm)
    apply_routes(routed, specs)
    w = materialize_route(routed, 2)
    name = "model.layers.1.mlp.down_proj"
    torch.testing.assert_close(w[name + ".weight"], llm.get_submodule(name).weight + dense[2][name])
    assert set(routed.state_dict()) >= set(llm.state_dict())  # base names unchanged
    remove_routes(routed)
    assert not routed_modules(routed)
    ids = torch.arange(3, 9).view(1, -1)
    with torch.no_grad():
        torch.testing.assert_close(routed(input_ids=ids).logits, llm(input_ids=ids).logits)


def test_errors_are_config_errors():
    llm = tiny_llm()
    with pytest.raises(ConfigError, match="does not fit"):
        apply_routes(llm, {1: {"model.layers.0.self_attn.q_proj": Dense(torch.zeros(3, 3))}})
    with pytest.raises(ConfigError, match="not an nn.Linear"):
        apply_routes(llm, {1: {"model.layers.0.input_layernorm": Dense(torch.zeros(32, 32))}})
    with pytest.raises(ConfigError, match="no module"):
        apply_routes(llm, {1: {"model.layers.9.self_attn.q_proj": Dense(torch.zeros(32, 32))}})
    with pytest.raises(ConfigError, match="outside target_modules"):
        apply_routes(llm, {1: {"model.layers.0.mlp.up_proj": Dense(torch.zeros(64, 32))}}, target_modules=["q_proj"])
    with pytest.raises(ConfigError, match="packed mask"):
        apply_routes(llm, {1: {"model.layers.0.self_attn.q_proj": Masked(torch.zeros(32, 32),
                                                                          torch.zeros(3, dtype=torch.uint8))}})
    assert "lm_head" not in linear_names(llm)


# -------------------------------------------------------------------------------------------- caches
def _masked_components(llm):
    from workbench.routing import _MaskedC

    return [m for m in llm.modules() if isinstance(m, _MaskedC)]


def test_masked_cache_is_bit_identical_and_invalidated():
    """The cached ``mask ⊙ shared`` gives exactly the uncached output, and is rebuilt when the mask
    (set_mask), the shared tensor (in-place edit) or α changes - never a stale matrix."""
    from workbench.routing import set_masked_cache, set_route_coefficients

    llm = tiny_llm()
    specs, _ = random_routes(llm)
    apply_routes(llm, specs)
    ref = copy.deepcopy(llm)
    assert set_masked_cache(ref, False) == len(_masked_components(ref)) > 0
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(3))
    rid = torch.tensor([[0, 2, 2, 1, 0, 2, 0], [2, 2, 0, 0, 1, 1, 2]])

    def run(m, r=rid):
        with torch.no_grad(), token_routes(m, r):
            return m(input_ids=ids).logits

    out = run(llm)
    comps = _masked_components(llm)
    assert all(c._masked_cache is not None for c in comps)  # filled by the first call
    assert all(c._masked_cache is None for c in _masked_components(ref))
    assert torch.equal(out, run(ref)) and torch.equal(run(llm), out)
    # the matrix formed the first time is reused while nothing changed
    held = [c._masked_cache[4] for c in comps]
    run(llm)
    assert all(c._masked_cache[4] is h for c, h in zip(comps, held))
    # α (the component's coefficient) is applied after the cached product
    for m in (llm, ref):
        set_route_coefficients(m, 2, {None: 0.3})
    out_a = run(llm)
    assert torch.equal(out_a, run(ref)) and not torch.equal(out_a, out)
    # a new mask
    g = torch.Generator().manual_seed(9)
    for c, c_ref in zip(comps, _masked_components(ref)):
        new = torch.rand(c.shape, generator=g) < 0.6
        c.set_mask(new)
        c_ref.set_mask(new)
    out_m = run(llm)
    assert torch.equal(out_m, run(ref)) and not torch.equal(out_m, out_a)
    # the shared tensor edited in place (version counter)
    for m in (llm, ref):
        for rl in routed_modules(m).values():
            rl.shared_0.mul_(2.0)
    out_s = run(llm)
    assert torch.equal(out_s, run(ref)) and not torch.equal(out_s, out_m)
    # matrices above the size cap are never cached (a 7B model would hold one dense LLM per route)
    import workbench.routing as R
    cap = R.MASKED_CACHE_MAX_NUMEL
    try:
        R.MASKED_CACHE_MAX_NUMEL = min(c.shape[0] * c.shape[1] for c in comps) - 1
        set_masked_cache(llm, True)
        assert torch.equal(run(llm), out_s)
        assert all(c._masked_cache is None for c in comps)
    finally:
        R.MASKED_CACHE_MAX_NUMEL = cap
    # switching the cache off frees it
    run(llm)
    assert all(c._masked_cache is not None for c in comps)
    set_masked_cache(llm, False)
    assert all(c._masked_cache is None for c in comps)
    assert torch.equal(run(llm), out_s)


def test_inference_routes_equal_the_routed_layers_and_follow_every_change():
    """fuse_routes_for_inference: the same modules and state dict; without autograd each route's tokens go
    through W0 + delta formed once - the brute-force reference's outputs (mixed routes, an empty route, a
    decode step), re-formed after every change a composition makes (a coefficient, a mask, a tensor edited in
    place, a route replaced); with autograd, and for a bfloat16 or oversized weight, exactly RoutedLinear."""
    import workbench.routing as R

    llm = tiny_llm()
    routed, specs, dense, ref, holder = routed_and_reference(llm)
    fused = copy.deepcopy(routed)
    n_routed = len(routed_modules(routed))
    assert R.fuse_routes_for_inference(fused) == n_routed > 0
    assert R.fuse_routes_for_inference(fused) == 0  # already turned
    assert all(type(m) is R.InferenceRoutedLinear for m in routed_modules(fused).values())
    sd, sd_fused = routed.state_dict(), fused.state_dict()
    assert list(sd) == list(sd_fused) and all(torch.equal(sd[k], sd_fused[k]) for k in sd)
    ids = torch.randint(0, 50, (3, 10), generator=torch.Generator().manual_seed(6))

    def run(m, rid, grad=False):
        with torch.set_grad_enabled(grad), token_routes(m, rid):
            return m(input_ids=ids).logits

    rl = routed_modules(fused)["model.layers.0.self_attn.q_proj"]
    formed = []
    for rid in (torch.full((3, 10), 1),  # one route holds every token
                torch.tensor([[0, 2, 2, 0, 0, 2, 0, 0, 2, 2]] * 3),  # route 1 empty
                torch.randint(0, 3, (3, 10), generator=torch.Generator().manual_seed(7))):  # mixed
        holder["rid"] = rid
        with torch.no_grad():
            want = ref(input_ids=ids).logits
        torch.testing.assert_close(run(fused, rid), want, rtol=1e-4, atol=1e-5)
        formed.append(set(rl._fused))
    assert formed == [{"1"}, {"0", "1", "2"}, {"0", "1", "2"}]  # a route is formed when it first has tokens
    # a decode step (its length differs from the prompt's route ids): the text route, as RoutedLinear
    kv = kv_cache_argument(llm)
    rid = torch.tensor([[0, 1, 1, 2, 2, 0, 0]])
    steps = []
    for m in (routed, fused):
        with torch.no_grad(), token_routes(m, rid):
            out = m(input_ids=ids[:1, :7], use_cache=True)
            steps.append(m(input_ids=torch.tensor([[11]]), use_cache=True, **{kv: out[kv]}).logits)
    torch.testing.assert_close(steps[1], steps[0], rtol=1e-4, atol=1e-5)
    # every change a composition makes is followed: the fused model stays the routed model
    rid = torch.randint(0, 3, (3, 10), generator=torch.Generator().manual_seed(7))
    before = run(fused, rid)
    g = torch.Generator().manual_seed(9)

    def coefficient(m):
        R.set_route_coefficients(m, 2, {None: 0.3})

    def new_masks(m, g_state=g.get_state()):
        g.set_state(g_state)
        for c in _masked_components(m):
            c.set_mask(torch.rand(c.shape, generator=g) < 0.6)

    def in_place(m):
        for mod in routed_modules(m).values():
            mod.shared_0.mul_(2.0)

    def new_route(m):
        for mod in routed_modules(m).values():
            mod.set_route(1, Dense(0.01 * torch.ones(mod.out_features, mod.in_features)))

    for change in (coefficient, new_masks, in_place, new_route):
        change(routed)
        change(fused)
        after = run(fused, rid)
        torch.testing.assert_close(after, run(routed, rid), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(after, before), change.__name__
        before = after
    # with autograd (training): RoutedLinear's computation, bit for bit, and its gradients
    assert torch.equal(run(fused, rid, grad=True), run(routed, rid, grad=True))
    # not fused: a bfloat16 weight (W0 + delta would round the delta away) or one above the size cap
    cap = R.FUSED_MAX_NUMEL
    try:
        R.FUSED_MAX_NUMEL = 0
        assert torch.equal(run(fused, rid), run(routed, rid))
    finally:
        R.FUSED_MAX_NUMEL = cap
    half = copy.deepcopy(routed).to(torch.bfloat16)
    half_fused = copy.deepcopy(half)
    R.fuse_routes_for_inference(half_fused)
    with torch.no_grad(), token_routes(half, rid):
        want = half(input_ids=ids).logits
    with torch.no_grad(), token_routes(half_fused, rid):
        got = half_fused(input_ids=ids).logits
    assert torch.equal(got, want)
    assert all(m._fused is None for m in routed_modules(half_fused).values())


def test_route_plan_follows_the_route_ids_and_grad_mode():
    """The token positions per route are computed once per route_ids tensor and shared by the
    modules: a new tensor, or the same one edited in place, gets its own; the in-place (no-grad)
    accumulation equals the autograd path exactly."""
    llm, specs, dense, ref, holder = routed_and_reference(tiny_llm())
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(4))
    rid = torch.tensor([[0, 1, 1, 2, 0, 0], [2, 2, 0, 1, 0, 2]])
    outs = []
    for r in (rid, torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])):
        with torch.no_grad(), token_routes(llm, r):
            got = llm(input_ids=ids).logits
        holder["rid"] = r
        with torch.no_grad():
            want = ref(input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        with token_routes(llm, r):
            assert torch.equal(llm(input_ids=ids).logits.detach(), got)  # autograd path, same sums
        outs.append(got)
    rid[0, 0] = 2  # the same tensor edited in place
    with torch.no_grad(), token_routes(llm, rid):
        got = llm(input_ids=ids).logits
    holder["rid"] = rid
    with torch.no_grad():
        torch.testing.assert_close(got, ref(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
    assert not torch.equal(got, outs[0])


def test_token_routes_reaches_every_routed_module_and_restores():
    llm = tiny_llm()
    specs, _ = random_routes(llm)
    apply_routes(llm, specs)
    from workbench.routing import RoutedModule

    every = [m for m in llm.modules() if isinstance(m, RoutedModule)]
    assert list(routed_modules(llm)) == [n for n, m in llm.named_modules() if isinstance(m, RoutedLinear)]
    rid = torch.zeros(1, 3, dtype=torch.long)
    with token_routes(llm, rid):
        assert all(m.route_ids is rid for m in every)
    assert all(m.route_ids is None for m in every)
