"""Knowledge adaptors and how their outputs enter each deepctr backbone (real deepctr models)."""

from __future__ import annotations

import pytest
import torch

from recaug.ctr_models.adaptor import HybridExpertAdaptor, MLPAdaptor, build_adaptor
from recaug.ctr_models.data import build_ctr_data
from recaug.ctr_models.deepctr_import import SparseFeat
from recaug.ctr_models.network import RoutedInputs, build_model
from recaug.ctr_models.toy import make_toy_world
from recaug.ctr_models.zoo import MODEL_NAMES, get_backbone
from recaug.core.config import CTRConfig

D = 384  # the packaged encoder's width


@pytest.fixture(scope="module")
def data384():
    world = make_toy_world(n_users=40, n_items=30, per_user=24, vector_dim=D, n_synthetic=0, seed=3)
    return build_ctr_data(world.samples, world.users, world.items, world.split, world.vectors, history_len=8)


def test_hybrid_adaptor_structure_and_shapes():
    torch.manual_seed(0)
    adaptor = HybridExpertAdaptor([D, D], n_shared=3, n_dedicated=4, hidden=128)
    assert len(adaptor.shared) == 3
    assert [len(d) for d in adaptor.dedicated] == [4, 4]
    assert [g.out_features for g in adaptor.gates] == [7, 7]  # one gate per vector over shared + its own
    expert = adaptor.shared[0]
    linears = [m for m in expert if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(D, 128), (128, 32)]
    x_user, x_item = torch.randn(5, D), torch.randn(5, D)
    out = adaptor([x_user, x_item])
    assert [tuple(o.shape) for o in out] == [(5, 32), (5, 32)]
    assert adaptor.output_dims == (32, 32)

    # the output is the gate-weighted mix of shared + that vector's dedicated experts
    with torch.no_grad():
        gate = torch.softmax(adaptor.gates[1](x_item), dim=-1)
        experts = [e(x_item) for e in adaptor.shared] + [e(x_item) for e in adaptor.dedicated[1]]
        expected = sum(gate[:, k : k + 1] * experts[k] for k in range(7))
    torch.testing.assert_close(out[1], expected)
    # changing the user vector does not change the item output (gates and dedicated experts are per vector)
    out2 = adaptor([torch.randn(5, D), x_item])
    torch.testing.assert_close(out2[1], out[1])


def test_hidden_width_comes_from_the_config(data384):
    for hidden in (32, 128):
        model = build_model("deepfm", data384.spec, CTRConfig(adaptor="hybrid", adaptor_hidden_dim=hidden), seed=0)
        experts = [*model.adaptor.shared, *model.adaptor.dedicated[0]]
        assert {(e[0].in_features, e[0].out_features, e[3].out_features) for e in experts} == {(D, hidden, 32)}
    assert CTRConfig().adaptor_hidden_dim == 128  # KAR's width


def test_adaptor_options_and_errors():
    assert build_adaptor("none", [D, D]).output_dims == ()
    assert build_adaptor("raw", [D, 16]).output_dims == (D, 16)
    mlp = build_adaptor("mlp", [D, 16])
    assert isinstance(mlp, MLPAdaptor) and mlp.output_dims == (32, 32)
    assert [tuple(o.shape) for o in mlp([torch.randn(2, D), torch.randn(2, 16)])] == [(2, 32), (2, 32)]
    with pytest.raises(ValueError, match="one width"):
        build_adaptor("hybrid", [D, 16])
    with pytest.raises(ValueError, match="at least one vector"):
        build_adaptor("hybrid", [])
    with pytest.raises(ValueError, match="unknown adaptor"):
        build_adaptor("moe", [D])


def _batch(data, n=6):
    ids = data.split("train").ids[:n]
    vectors, missing = data.gather_vectors(ids)
    return ids, vectors, missing


@pytest.mark.parametrize("dnn_copy", [None, True, False])
@pytest.mark.parametrize("adaptor", ["hybrid", "mlp", "raw", "none"])
@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_adaptor_outputs_reach_each_backbone(data384, model_name, adaptor, dnn_copy):
    cfg = CTRConfig(adaptor=adaptor, embedding_dim=8, vector_dnn_copy=dnn_copy)
    model = build_model(model_name, data384.spec, cfg, seed=0)
    backbone_def = get_backbone(model_name)
    # the layout: a field backbone's own choice for learnt outputs, the copy for raw vectors, else the setting
    fields_only = backbone_def.knowledge_fields and adaptor != "none" and (
        dnn_copy is False or (dnn_copy is None and adaptor != "raw" and not backbone_def.vector_dnn_copy))
    assert model.vector_dnn_copy is not fields_only
    ids, vectors, missing = _batch(data384)
    n_vec = len(data384.spec.vectors) if adaptor != "none" else 0
    out_dim = {"hybrid": 32, "mlp": 32, "raw": D, "none": 0}[adaptor]

    outputs = model.adaptor_outputs(vectors)
    assert [tuple(o.shape) for o in outputs] == [(6, out_dim)] * n_vec

    X = model.assemble_inputs(ids, vectors, missing)
    assert X.shape == (6, model.input_width)
    fi = model.backbone.feature_index
    for k, vec in enumerate(data384.spec.vectors[:n_vec]):
        a, b = fi[vec.slug]
        assert b - a == out_dim
        torch.testing.assert_close(X[:, a:b], outputs[k])  # the dense input is the adaptor output
        a, b = fi[f"{vec.slug}__missing"]
        torch.testing.assert_close(X[:, a], missing[:, k])

    # extra fields: field-interaction models get one projected field per vector, the others none
    sparse_list, dense_list = model.backbone.input_from_feature_columns(
        X, model.backbone.dnn_feature_columns, model.backbone.embedding_dict
    )
    # the DNN takes the missing flags, and the outputs themselves unless they reach it only as fields
    assert sum(t.shape[1] for t in dense_list) == n_vec * ((0 if fields_only else out_dim) + 1)
    assert model.backbone.dnn.linears[0].in_features == sum(t.shape[1] for t in dense_list) + sum(
        t.shape[1] * t.shape[2] for t in sparse_list)
    fields = [fc for fc in model.backbone.dnn_feature_columns if isinstance(fc, SparseFeat) and fc.name.endswith("__field")]
    assert len(fields) == (n_vec if backbone_def.knowledge_fields else 0)
    # the embedding list holds the SparseFeat columns first, in declaration order
    names = [c.name for c in model.backbone.dnn_feature_columns if isinstance(c, SparseFeat)]
    for k, vec in enumerate(data384.spec.vectors[:n_vec]):
        if backbone_def.knowledge_fields:
            pos = names.index(f"{vec.slug}__field")
            assert sparse_list[pos].shape == (6, 1, 8)
            projected = model.backbone.knowledge_projections[f"{vec.slug}__field"](outputs[k]).unsqueeze(1)
            torch.testing.assert_close(sparse_list[pos], projected)

    probs = model(ids, vectors, missing)
    assert probs.shape == (6,) and bool(((probs > 0) & (probs < 1)).all())
    if adaptor in ("hybrid", "mlp"):
        # trained jointly: the loss gradient reaches the adaptor's first layer
        probs.sum().backward()
        grads = [p.grad for p in model.adaptor.parameters() if p.grad is not None]
        assert grads and any(float(g.abs().sum()) > 0 for g in grads)


@pytest.mark.parametrize("dnn_copy", [True, False])
@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_routed_inputs_give_every_backbone_the_gradients_of_one_input_tensor(data384, model_name, dnn_copy):
    """With the adaptor outputs routed (`RoutedInputs`: each backbone read of their columns returns the
    output itself) every weight gets exactly the gradient it gets when X is one tensor with gradient:
    no backbone reads those columns in a way the routes miss."""
    from recaug.ctr_models.network import RoutedInputs

    cfg = CTRConfig(adaptor="hybrid", embedding_dim=8, vector_dnn_copy=dnn_copy)
    model = build_model(model_name, data384.spec, cfg, seed=0)
    model.attach_vectors(data384.vectors)
    ids = data384.split("train").ids[:64]
    assert isinstance(model.assemble_inputs(ids), RoutedInputs) and not model.assemble_inputs(ids).requires_grad
    grads = {}
    for routed in (True, False):
        model.route_inputs = routed
        model.zero_grad()
        (model(ids).sum() + model.regularization_loss()).backward()
        grads[routed] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys()
    assert any(n.startswith("adaptor.") for n in grads[True])
    for name, g in grads[True].items():
        torch.testing.assert_close(g, grads[False][name], msg=name)
    with torch.no_grad():  # nothing needs a gradient: a plain tensor
        assert type(model.assemble_inputs(ids)) is torch.Tensor
    # the training path: batches read their rows from an adaptor window
    batches = [ids[:32], ids[32:]]
    for routed in (True, False):
        model.route_inputs = routed
        model.zero_grad()
        window = model.adaptor_window(batches)
        for b in batches:
            (model(b, window=window).sum() + model.regularization_loss()).backward()
        window.backward()
        grads[routed] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys() and any(n.startswith("adaptor.") for n in grads[True])
    for name, g in grads[True].items():
        torch.testing.assert_close(g, grads[False][name], msg=name)
    # a read that covers an adaptor output's columns only in part would lose its gradient: an error
    model.route_inputs = True
    X = model.assemble_inputs(ids)
    a, b = next(iter(X.routes))
    with pytest.raises(RuntimeError, match="overlaps an adaptor output"):
        X[:, a:b - 1]
    torch.testing.assert_close(X[:, 0:a], model.assemble_inputs(ids).detach()[:, 0:a])


@pytest.mark.parametrize("adaptor", ["hybrid", "mlp", "raw"])
def test_vectors_looked_up_inside_the_model_equal_the_gathered_ones(data384, adaptor):
    """The training path (tables attached to the model, adaptor once per distinct entity) gives the
    inputs, outputs and gradients of the per-sample path (vectors gathered per sample and passed in)."""
    cfg = CTRConfig(adaptor=adaptor, embedding_dim=8)
    model = build_model("deepfm", data384.spec, cfg, seed=0)
    ids = data384.split("train").ids[:64]  # users and items repeat within the batch
    assert ids[:, data384.spec.id_columns()["user_id"][0]].unique().numel() < 64
    vectors, missing = data384.gather_vectors(ids)
    X_passed = model.assemble_inputs(ids, vectors, missing)
    with pytest.raises(RuntimeError, match="attach_vectors"):
        model.assemble_inputs(ids)
    model.attach_vectors(data384.vectors)
    X_indexed = model.assemble_inputs(ids)
    torch.testing.assert_close(X_indexed, X_passed)
    model(ids).sum().backward()
    grads = [p.grad.clone() for p in model.adaptor.parameters()]
    model.zero_grad()
    model(ids, vectors, missing).sum().backward()
    for g, p in zip(grads, model.adaptor.parameters()):
        torch.testing.assert_close(g, p.grad)
    assert not any(k.startswith("vector_") for k in model.state_dict())  # checkpoints hold weights only


def test_hybrid_adaptor_takes_vectors_of_different_row_counts():
    torch.manual_seed(0)
    adaptor = HybridExpertAdaptor([D, D])
    users, items = torch.randn(3, D), torch.randn(5, D)
    out = adaptor([users, items])
    assert [tuple(o.shape) for o in out] == [(3, 32), (5, 32)]
    # row by row the same function as a batch of equal counts
    torch.testing.assert_close(out[0][:2], adaptor([users[:2], items[:2]])[0])


def test_adaptor_window_gives_each_batch_the_adaptor_outputs_and_sums_their_gradients(data384):
    """A window runs the adaptor once over the distinct entities of several batches: every batch sees
    exactly what the adaptor gives it alone, and the window's backward pass leaves in the adaptor the
    sum of the gradients the batches would have sent one by one."""
    model = build_model("deepfm", data384.spec, CTRConfig(adaptor="hybrid", embedding_dim=8), seed=0)
    model.attach_vectors(data384.vectors)
    ids = data384.split("train").ids
    batches = [ids[:40], ids[40:90], ids[90:120]]
    window = model.adaptor_window(batches)
    id_cols = data384.spec.id_columns()
    for k, vec in enumerate(data384.spec.vectors):  # once per distinct user / item of the three batches
        col = id_cols[f"{vec.kind}_id"][0]
        torch.testing.assert_close(window.distinct[k], torch.cat([b[:, col] for b in batches]).unique())
    for b in batches:
        torch.testing.assert_close(model.assemble_inputs(b, window=window), model.assemble_inputs(b))
    for b in batches:  # the backbone's backward pass stops at the window's leaves
        model(b, window=window).sum().backward()
    assert all(p.grad is None for p in model.adaptor.parameters())
    window.backward()
    summed = [p.grad.clone() for p in model.adaptor.parameters()]
    model.zero_grad()
    for b in batches:
        model(b).sum().backward()  # one batch at a time, gradients accumulate
    for g, p in zip(summed, model.adaptor.parameters()):
        torch.testing.assert_close(g, p.grad)
    with pytest.raises(ValueError, match="outside its adaptor window"):
        model(ids[120:200], window=model.adaptor_window([ids[:8]]))


def test_windowed_adaptor_steps_once_per_window_at_a_scaled_rate(data384):
    from recaug.ctr_models.train import _batch_bounds, _train_epoch, make_optimizer

    cfg = CTRConfig(adaptor="hybrid", embedding_dim=8, batch_size=16, adaptor_update_every=4)
    model = build_model("deepfm", data384.spec, cfg, seed=0)
    opt = make_optimizer(model, cfg)
    assert [g["lr"] for g in opt.param_groups] == [cfg.learning_rate, cfg.learning_rate * 4]
    train = data384.split("train")
    n_batches = len(_batch_bounds(len(train), cfg.batch_size))
    before = [p.detach().clone() for p in model.adaptor.parameters()]
    loss = _train_epoch(model, data384, train, opt, cfg.batch_size, torch.Generator().manual_seed(0))
    assert loss > 0
    steps = {int(opt.state[p]["step"]) for p in model.adaptor.parameters()}
    assert steps == {-(-n_batches // 4)}  # one Adam step per window
    assert {int(opt.state[p]["step"]) for p in model.backbone.parameters() if p in opt.state} == {n_batches}
    assert any(not torch.equal(b, p) for b, p in zip(before, model.adaptor.parameters()))


def test_distinct_with_inverse_equals_torch_unique():
    from recaug.ctr_models.network import distinct_with_inverse

    gen = torch.Generator().manual_seed(0)
    # presence-map path, the sort fallback, the boundary between them, and no values at all
    for size, n in [(50, 400), (50, 7), (10_000, 30), (1, 5), (40, 10), (41, 10), (5, 0), (0, 0)]:
        values = torch.randint(0, max(size, 1), (n,), generator=gen)
        distinct, inverse = distinct_with_inverse(values, size)
        expected, expected_inverse = torch.unique(values, return_inverse=True)
        assert torch.equal(distinct, expected) and torch.equal(inverse, expected_inverse)


@pytest.mark.parametrize("model_name", [n for n in MODEL_NAMES if get_backbone(n).knowledge_fields])
def test_knowledge_field_placeholders_are_neither_looked_up_nor_regularized(data384, model_name):
    """The placeholder embeddings keep their state-dict keys (checkpoints load either way), but their
    slots take the projected adaptor outputs without a lookup, and no L2 term trains weights nothing reads."""
    model = build_model(model_name, data384.spec, CTRConfig(adaptor="hybrid", embedding_dim=8), seed=0)
    model.attach_vectors(data384.vectors)
    ids = data384.split("train").ids[:32]
    placeholders = [f"embedding_dict.{v.slug}__field.weight" for v in data384.spec.vectors]
    assert all(f"backbone.{name}" in model.state_dict() for name in placeholders)
    X = model.assemble_inputs(ids)
    fi = model.backbone.feature_index
    poisoned = X.clone()
    for v in data384.spec.vectors:  # an index outside the placeholder's 1-row table: a lookup would fail
        a, b = fi[f"{v.slug}__field"]
        poisoned[:, a:b] = 7.0
    poisoned = RoutedInputs(poisoned, X.routes)
    torch.testing.assert_close(model.backbone(poisoned), model.backbone(X))
    regularized = {id(w[1] if isinstance(w, tuple) else w) for ws, _, _ in model.backbone.regularization_weight for w in ws}
    weights = dict(model.backbone.named_parameters())
    assert not any(id(weights[name]) in regularized for name in placeholders)
    assert id(weights["embedding_dict.user_id.weight"]) in regularized  # the real fields keep theirs
    (model(ids).sum() + model.regularization_loss()).backward()
    assert all(weights[name].grad is None for name in placeholders)
    assert weights["embedding_dict.user_id.weight"].grad is not None


def test_adaptor_window_missing_flags_equal_the_per_batch_lookup():
    world = make_toy_world(n_users=40, n_items=30, per_user=24, vector_dim=16, n_synthetic=0, seed=3)
    # a third of the users and items have no vector
    vectors = {key: table.take([i for i in range(table.num_rows) if i % 3]) for key, table in world.vectors.items()}
    data = build_ctr_data(world.samples, world.users, world.items, world.split, vectors, history_len=8)
    model = build_model("deepfm", data.spec, CTRConfig(adaptor="hybrid", embedding_dim=8), seed=0)
    model.attach_vectors(data.vectors)
    ids = data.split("train").ids
    batches = [ids[:40], ids[40:90]]
    window = model.adaptor_window(batches)
    for b in batches:
        flags = model._missing_flags(b)
        assert 0 < float(flags.sum()) < flags.numel()
        torch.testing.assert_close(window.positions(b, model._entity_columns)[1], flags)
        torch.testing.assert_close(model.assemble_inputs(b, window=window), model.assemble_inputs(b))
        # a batch the window was not opened with (inside its entities) looks its flags up itself
        other = b[torch.arange(b.shape[0] - 1, -1, -1)]
        assert window.positions(other, model._entity_columns)[1] is None
        torch.testing.assert_close(model.assemble_inputs(other, window=window), model.assemble_inputs(other))
