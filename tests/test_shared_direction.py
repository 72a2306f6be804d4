"""workbench.analysis.shared: the split of task vectors along the experts' mean direction, checked
against closed forms (identical experts, opposite experts, orthogonal experts) and its identities
(shared + residual = tau; the residuals sum to zero; the weight average is theta_0 + the mean shared part)."""
import numpy as np
import pytest
import torch

from workbench.analysis.shared import dict_cosine, loss_gradient, mean_direction_split, with_delta


def _state(seed, shapes=((6, 5), (7,), (3, 4))):
    g = torch.Generator().manual_seed(seed)
    return {f"model.layers.{i}.mlp.up_proj.weight" if len(s) == 2 else f"model.layers.{i}.input_layernorm.weight":
            torch.randn(s, generator=g) for i, s in enumerate(shapes)}


def test_identical_experts_share_everything():
    base, tau = _state(0), _state(1)
    experts = [{t: base[t] + tau[t] for t in base} for _ in range(3)]
    split = mean_direction_split(base, experts)
    assert np.allclose(split.table["share"], 1.0) and np.allclose(split.table["mean_pair_cosine"], 1.0)
    for i in range(3):
        for t in base:
            assert torch.allclose(split.shared(i)[t], tau[t], atol=1e-6)
            assert split.residual(i)[t].abs().max() < 1e-6
    assert split.share() == pytest.approx(1.0)


def test_opposite_experts_share_nothing():
    base, tau = _state(0), _state(1)
    experts = [{t: base[t] + tau[t] for t in base}, {t: base[t] - tau[t] for t in base}]
    split = mean_direction_split(base, experts)
    assert not split.directions  # the mean task vector is zero: no direction
    assert np.allclose(split.table["share"], 0.0) and np.allclose(split.table["mean_pair_cosine"], -1.0)
    assert all(torch.allclose(split.residual(0)[t], tau[t], atol=1e-6) for t in base)


def test_orthogonal_experts_closed_form():
    """N orthogonal task vectors of equal norm: the mean direction holds 1/N of their energy,
    each c_i = ||tau|| / sqrt(N), pairwise cosine 0."""
    base = {"model.layers.0.mlp.up_proj.weight": torch.zeros(4, 3)}
    eye = torch.eye(12)
    experts = [{"model.layers.0.mlp.up_proj.weight": 2.0 * eye[i].view(4, 3)} for i in range(4)]
    split = mean_direction_split(base, experts)
    row = split.table.iloc[0]
    assert row["share"] == pytest.approx(0.25) and row["mean_pair_cosine"] == pytest.approx(0.0)
    assert torch.allclose(split.coefficients["model.layers.0.mlp.up_proj.weight"], torch.full((4,), 1.0, dtype=torch.float64))


def test_parts_add_up_and_residuals_cancel():
    base = _state(0)
    experts = [{t: base[t] + _state(10 + i)[t] * 0.1 for t in base} for i in range(4)]
    split = mean_direction_split(base, experts)
    for t in base:
        for i in range(4):
            assert torch.allclose(split.shared(i)[t] + split.residual(i)[t], experts[i][t] - base[t], atol=1e-6)
        assert sum(split.residual(i)[t] for i in range(4)).abs().max() < 1e-5
        mean_tau = sum(experts[i][t] - base[t] for i in range(4)) / 4
        assert torch.allclose(sum(split.shared(i)[t] for i in range(4)) / 4, mean_tau, atol=1e-6)
    modules = split.by_module()
    assert set(modules.index) == set(split.table["module"]) and ((modules["share"] >= 0) & (modules["share"] <= 1)).all()


def test_bad_input_is_named():
    base = _state(0)
    with pytest.raises(KeyError, match="up_proj"):
        mean_direction_split(base, [base, {t: v for t, v in base.items() if "up_proj" not in t}])
    with pytest.raises(ValueError, match="at least 2"):
        mean_direction_split(base, [base])


def test_with_delta_and_gradient_and_cosine():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    moved = with_delta(lin, {"weight": torch.ones(2, 3)})
    assert torch.allclose(moved.weight, lin.weight + 1) and moved is not lin

    class Out:
        def __init__(self, loss):
            self.loss = loss

    x = torch.randn(5, 3)
    model = lambda inp: Out(((lin(inp)) ** 2).mean())  # noqa: E731
    lin.requires_grad_(False)
    g = loss_gradient(model, lin, iter([x, x]), 2, lambda b: (b,))
    w = lin.weight.detach().clone().requires_grad_(True)
    b = lin.bias.detach().clone().requires_grad_(True)
    ((x @ w.T + b) ** 2).mean().backward()
    assert torch.allclose(g["weight"], -w.grad) and torch.allclose(g["bias"], -b.grad)
    assert not lin.weight.requires_grad  # restored
    assert dict_cosine(g, g) == pytest.approx(1.0)
    assert dict_cosine(g, {k: -v for k, v in g.items()}) == pytest.approx(-1.0)


def test_pair_cosines_closed_form():
    """g(m, t) = v_t + w_m with orthonormal v's and w's: cosine 1/2 for the same task in two modalities or two
    tasks in one modality, 0 for different both; one row per unordered pair."""
    from workbench.analysis.shared import pair_cosines

    basis = torch.eye(7, dtype=torch.float64)
    v = {"present": basis[0], "count": basis[1], "first": basis[2]}
    w = {"image": basis[3], "audio": basis[4], "video": basis[5]}
    vectors = {(m, t): {"x": (v[t] + w[m]).reshape(1, 7), "y": torch.zeros(2)} for m in w for t in v}
    df = pair_cosines(vectors)
    assert len(df) == 9 * 8 // 2
    by = df.groupby(["same_modality", "same_task"])["cosine"]
    assert by.min().to_dict() == pytest.approx(by.max().to_dict())  # every pair of a kind alike
    assert by.mean().to_dict() == pytest.approx({(False, False): 0.0, (False, True): 0.5, (True, False): 0.5})
