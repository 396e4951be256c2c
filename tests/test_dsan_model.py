import importlib.util

import pytest
import torch

import testing  # noqa: F401  (puts the checkout on sys.path)
from dsan.errors import ConfigError
from dsan.model import DSAN, attention_normaliser

N_ITEMS = 50


def entmax_cuda_built() -> bool:
    try:
        import entmax_cuda  # noqa: F401

        return True
    except ImportError:
        return False


needs_fused = pytest.mark.skipif(not entmax_cuda_built(), reason="entmax_cuda extension not built")
ATTENTIONS = ["softmax", "entmax-reference", "entmax:1.5",
              pytest.param("adaptive-entmax", marks=needs_fused)]


def make_model(attention="softmax", **kwargs):
    torch.manual_seed(0)
    return DSAN(N_ITEMS, max_session_length=20, embedding_dim=8, attention=attention, **kwargs).eval()


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_padding_in_a_batch_does_not_change_a_session_scores(attention):
    model = make_model(attention)
    sessions = [[3, 7, 7, 1], [5, 2], [9, 8, 4, 6, 2, 11, 12]]
    width = max(map(len, sessions))
    batch = torch.tensor([s + [0] * (width - len(s)) for s in sessions])
    lengths = torch.tensor([len(s) for s in sessions])
    with torch.no_grad():
        together = model(batch, lengths)
        for row, session in enumerate(sessions):
            alone = model(torch.tensor([session]), torch.tensor([len(session)]))
            torch.testing.assert_close(together[row], alone[0], rtol=1e-5, atol=1e-5)


def test_scores_cover_real_items_only_and_attention_is_normalised():
    model = make_model("entmax-reference")
    items, lengths = torch.tensor([[1, 2, 3, 0], [4, 5, 6, 7]]), torch.tensor([3, 4])
    with torch.no_grad():
        scores, attention = model(items, lengths, with_attention=True)
    assert scores.shape == (2, N_ITEMS)  # not N_ITEMS + 1: the target token is no candidate
    assert scores.abs().max() <= model.wk + 1e-4  # w_k * cosine
    torch.testing.assert_close(attention["self_weights"].sum(-1), torch.ones(2, 5))
    torch.testing.assert_close(attention["target_weights"].sum(-1), torch.ones(2))
    assert (attention["self_weights"][0, :, 3] == 0).all()  # padded key
    assert attention["target_weights"][0, 3] == 0
    assert ((attention["alpha_self"] > 1) & (attention["alpha_self"] < 2)).all()
    assert ((attention["alpha_target"] > 1) & (attention["alpha_target"] < 2)).all()


def test_alpha_near_two_gives_exact_zeros_where_softmax_does_not():
    model = make_model("entmax-reference")
    with torch.no_grad():
        model.alpha_layer.bias.fill_(20.0)  # alpha -> 2 (sparsemax)
        model.query.weight.mul_(30)  # peaked scores
    items, lengths = torch.tensor([[1, 2, 3, 4, 5, 6]]), torch.tensor([6])
    with torch.no_grad():
        _, sparse = model(items, lengths, with_attention=True)
        model.set_attention("softmax")
        _, dense = model(items, lengths, with_attention=True)
    assert (sparse["self_weights"] == 0).sum() > 0
    assert (dense["self_weights"] == 0).sum() == 0


def enlarged_model():
    """A model whose embedding rows (but not the padding rows) are far above the 1.5 cap."""
    model = make_model()
    with torch.no_grad():
        model.item_embedding.weight[1:].mul_(10)
        model.position_embedding.weight[1:].mul_(10)
    return model


def test_padding_rows_of_embeddings_are_zero_and_training_caps_item_and_position_norms():
    model = make_model()
    assert model.item_embedding.weight[0].abs().sum() == 0
    assert model.position_embedding.weight[0].abs().sum() == 0
    model = enlarged_model().train()
    model(torch.tensor([[1, 2, 3]]), torch.tensor([3]))
    assert model.item_embedding.weight[1:4].norm(dim=1).max() <= 1.5 + 1e-4
    assert model.item_embedding.weight[model.target_id].norm() <= 1.5 + 1e-4
    assert model.position_embedding.weight[1:5].norm(dim=1).max() <= 1.5 + 1e-4  # 3 items + the target slot
    assert model.item_embedding.weight[10].norm() > 1.5  # rows not looked up keep their norm
    assert model.position_embedding.weight[5].norm() > 1.5
    assert model.item_embedding.weight[0].abs().sum() == 0


def test_evaluation_uses_capped_rows_without_writing_them():
    items, lengths = torch.tensor([[4, 2, 7, 0], [3, 9, 8, 5]]), torch.tensor([3, 4])
    model = enlarged_model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with torch.no_grad():
        scores = model(items, lengths)
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    model.renormalise_embeddings(items, lengths)  # what a training step would have written
    with torch.no_grad():
        assert torch.allclose(model(items, lengths), scores, atol=1e-6)


def test_global_batch_renormalisation_matches_what_the_forward_lookups_do():
    """Data-parallel ranks call renormalise_embeddings on the whole batch; it must touch
    exactly the rows a training forward pass over that batch looks up, and be idempotent."""
    items, lengths = torch.tensor([[4, 2, 7, 0], [3, 9, 8, 5]]), torch.tensor([3, 4])
    by_forward, by_call = enlarged_model().train(), enlarged_model()
    by_forward(items, lengths)
    by_call.renormalise_embeddings(items, lengths)
    for name in ("item_embedding.weight", "position_embedding.weight"):
        assert torch.equal(by_forward.state_dict()[name], by_call.state_dict()[name]), name
    before = {name: tensor.clone() for name, tensor in by_call.state_dict().items()}
    by_call.renormalise_embeddings(items, lengths)  # again: a no-op, to the bit
    by_call.train()(items[1:], lengths[1:])
    assert all(torch.equal(before[name], tensor) for name, tensor in by_call.state_dict().items())


def test_target_attention_initialisation():
    model = DSAN(2000, 10, embedding_dim=100)
    weight = model.target_item_weight.weight
    assert abs(weight.std().item() - 0.05) < 0.005
    assert model.target_bias.abs().sum() == 0


def test_learned_alpha_gets_gradient_under_entmax_not_softmax():
    for attention, expect_gradient in [("entmax-reference", True), ("softmax", False)]:
        model = make_model(attention).train()
        scores = model(torch.tensor([[1, 2, 3], [4, 5, 0]]), torch.tensor([3, 2]))
        loss = model.loss(scores, torch.tensor([6, 7]))
        loss.backward()
        grad = model.alpha_layer.weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == expect_gradient


@needs_fused
def test_fused_adaptive_entmax_matches_the_reference_model():
    fused, reference = make_model("adaptive-entmax"), make_model("entmax-reference")
    items, lengths = torch.tensor([[1, 2, 3, 4, 0], [5, 6, 7, 8, 9]]), torch.tensor([4, 5])
    with torch.no_grad():
        torch.testing.assert_close(fused(items, lengths), reference(items, lengths), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("entmax") is None, reason="the `entmax` library is not installed")
def test_entmax_bisect_library_option_matches_the_reference():
    library, reference = make_model("entmax-bisect-lib"), make_model("entmax-reference")
    items, lengths = torch.tensor([[1, 2, 3, 0], [5, 6, 7, 8]]), torch.tensor([3, 4])
    with torch.no_grad():
        torch.testing.assert_close(library(items, lengths), reference(items, lengths), rtol=1e-4, atol=1e-4)


def test_unknown_or_invalid_attention_is_rejected():
    with pytest.raises(ConfigError, match="attention must be one of"):
        attention_normaliser("sparsemax-ish")
    for bad in ("entmax:0.5", "entmax:x", "entmax:inf"):
        with pytest.raises(ConfigError, match="entmax:A needs a number A >= 1"):
            attention_normaliser(bad)


def test_loss_is_the_cross_entropy_of_the_scores_over_the_catalogue():
    model = make_model()
    scores = model(torch.tensor([[1, 2, 3], [4, 5, 0]]), torch.tensor([3, 2]))
    targets = torch.tensor([1, N_ITEMS])  # item ids 1..n_items are score columns 0..n_items-1
    expected = -(scores.log_softmax(-1)[0, 0] + scores.log_softmax(-1)[1, N_ITEMS - 1])
    torch.testing.assert_close(model.loss(scores, targets, reduction="sum"), expected)
    torch.testing.assert_close(model.loss(scores, targets), expected / 2)


def test_self_attention_is_entmax_of_scaled_query_key_scores_times_the_tokens():
    """The method a fused scaled-dot-product entmax will replace: its contract, spelled out."""
    model = make_model("entmax-reference")
    H = torch.randn(2, 4, model.d)
    is_key = torch.tensor([[True, True, False, True], [True, True, True, True]])
    alpha = torch.tensor([[1.3], [1.9]])
    with torch.no_grad():
        A, weights = model.self_attention(H, is_key, alpha)
        Q = torch.relu(model.query(H))  # eval mode: no dropout
        for b in range(2):
            scores = (Q[b] @ H[b].T / model.d ** 0.5).masked_fill(~is_key[b], float("-inf"))
            expected = model.normalise(scores, alpha[b].expand(4, 1), -1)
            torch.testing.assert_close(weights[b], expected)
            torch.testing.assert_close(A[b], expected @ H[b])
    assert (weights[0, :, 2] == 0).all()


def test_fixed_alpha_entmax_ignores_the_learned_alpha():
    normalise, learned = attention_normaliser("entmax:2")
    assert not learned
    scores = torch.tensor([[3.0, 1.0, -1.0]])
    weights = normalise(scores, torch.tensor([[1.0001]]), -1)  # sparsemax regardless of the alpha passed
    torch.testing.assert_close(weights, torch.tensor([[1.0, 0.0, 0.0]]), atol=1e-5, rtol=0)


def _random_batch(seed=1, batch=6, width=9):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (batch,), generator=g)
    lengths[0] = width
    items = torch.randint(1, N_ITEMS + 1, (batch, width), generator=g)
    items = torch.where(torch.arange(width)[None, :] < lengths[:, None], items, 0)
    return items, lengths


@needs_fused
@pytest.mark.parametrize("attention", ["adaptive-entmax", "entmax:1.5"])
def test_fused_self_attention_equals_the_materialised_scores(attention):
    """The entmax_cuda normalisers run step (3) as one fused scaled-dot-product entmax; the
    scores, the loss and every parameter's gradient (the alpha layer's too) equal those of the
    materialised path (with_attention=True) within float32 rounding."""
    items, lengths = _random_batch()
    targets = torch.randint(1, N_ITEMS + 1, (items.shape[0],), generator=torch.Generator().manual_seed(2))
    results = {}
    for materialised in (False, True):
        model = make_model(attention)
        calls = []
        fused = model.fused_attention
        model.fused_attention = lambda *args, **kwargs: calls.append(1) or fused(*args, **kwargs)
        out = model(items, lengths, with_attention=materialised)
        scores = out[0] if materialised else out
        model.loss(scores, targets).backward()
        assert bool(calls) != materialised  # the fused kernel ran exactly when the weights were not asked for
        results[materialised] = (scores.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                  if p.grad is not None})
    (fused_scores, fused_grads), (dense_scores, dense_grads) = results[False], results[True]
    torch.testing.assert_close(fused_scores, dense_scores, rtol=1e-5, atol=1e-5)
    assert fused_grads.keys() == dense_grads.keys()
    if attention == "adaptive-entmax":
        assert "alpha_layer.weight" in fused_grads
    for name in dense_grads:
        torch.testing.assert_close(fused_grads[name], dense_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@needs_fused
def test_fused_self_attention_returns_no_weights_and_the_materialised_path_does():
    model = make_model("adaptive-entmax")
    H = torch.randn(2, 5, model.d)
    is_key = torch.tensor([[True, True, True, False, True], [True] * 5])
    alpha = torch.tensor([[1.4], [1.8]])
    with torch.no_grad():
        A_fused, none = model.self_attention(H, is_key, alpha)
        A_dense, weights = model.self_attention(H, is_key, alpha, with_weights=True)
    assert none is None and weights.shape == (2, 5, 5)
    assert (weights[0, :, 3] == 0).all()
    # the fused path packs the sessions: padded query rows are not computed (0), the real rows agree
    torch.testing.assert_close(A_fused[is_key], A_dense[is_key], rtol=1e-5, atol=1e-6)
    assert (A_fused[~is_key] == 0).all()


def test_softmax_and_the_reference_keep_the_materialised_scores():
    for attention in ("softmax", "entmax-reference"):
        assert make_model(attention).fused_attention is None
