"""Every loss against an explicit loop reference (tests/reference_losses.py)."""

from __future__ import annotations

import pytest
import torch
from reference_losses import (
    brute_force_triplets,
    class_centers_reference,
    confidence_reference,
    kd_reference,
    local_classifier_reference,
    relationship_reference,
    rkd_reference,
)

from refilled_hf import losses
from refilled_hf.losses import (
    DEFAULT_RELATIONSHIP_WEIGHTS,
    batch_class_centers,
    class_centers,
    kd_loss,
    local_class_mask,
    local_classifier_loss,
    local_teacher_correct,
    ncm_predict,
    relationship_loss,
    relationship_loss_with_stats,
    rkd_loss,
    semi_hard_triplets,
    teacher_confidence_weights,
)

#: stage-1 variants; "tuple-fixed" forces the accelerators' fixed-shape tuple loss on the CPU
VARIANTS = ["tuple", "tuple-fixed", "triplet"]


def force_fixed_shapes(monkeypatch, fixed: bool = True) -> None:
    """Run stage 1's tuple loss in fixed shapes (the accelerators' path) on the CPU, or listed."""
    monkeypatch.setattr(losses, "_fixed_shapes", lambda device: fixed)


@pytest.fixture
def variant(request, monkeypatch) -> str:
    """A stage-1 variant of :data:`VARIANTS` (indirect parametrization), its path forced."""
    force_fixed_shapes(monkeypatch, request.param == "tuple-fixed")
    return request.param.removesuffix("-fixed")


@pytest.fixture(params=["listed", "fixed"])
def tuple_path(request, monkeypatch) -> str:
    """Both paths of the tuple loss, forced."""
    force_fixed_shapes(monkeypatch, request.param == "fixed")
    return request.param


def make_batch(seed: int, batch: int, classes: int, dim_s: int, dim_t: int):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(batch, dim_s, generator=g, requires_grad=True)
    t = torch.randn(batch, dim_t, generator=g)
    y = torch.randint(0, classes, (batch,), generator=g)
    return s, t, y


# ----------------------------------------------------------------- semi-hard mining


@pytest.mark.parametrize(
    "seed,batch,classes,dim,margin",
    [(0, 16, 3, 4, 0.2), (1, 30, 5, 8, 0.2), (2, 40, 4, 3, 0.5), (3, 25, 2, 16, 1.0), (4, 12, 12, 4, 0.2)],
)
def test_semi_hard_triplets_equal_brute_force(seed, batch, classes, dim, margin):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, dim, generator=g) * 0.5  # unnormalized rows: plain Euclidean distances
    labels = torch.randint(0, classes, (batch,), generator=g)
    a, p, n = semi_hard_triplets(emb, labels, margin=margin)
    mined = set(zip(a.tolist(), p.tolist(), n.tolist()))
    assert len(mined) == a.numel(), "a triplet was listed twice"
    sure, border = brute_force_triplets(emb, labels.tolist(), margin, tol=1e-5)
    assert sure <= mined
    assert mined <= sure | border
    if classes < batch:
        assert len(sure) > 0  # the case is not vacuous


def test_semi_hard_triplets_order_and_types():
    emb = torch.tensor([[0.0], [0.1], [0.27], [0.21], [5.0]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    a, p, n = semi_hard_triplets(emb, labels, margin=0.2)
    # anchor 0, positive 1 (d=0.1): negatives at 0.21 and 0.27 (< 0.3), nearest first.
    triplets = list(zip(a.tolist(), p.tolist(), n.tolist()))
    assert triplets[:2] == [(0, 1, 3), (0, 1, 2)]
    assert a.dtype == torch.int64
    assert set(triplets) == brute_force_triplets(emb, labels.tolist(), 0.2)[0]


def test_semi_hard_triplets_empty_cases():
    one_class = semi_hard_triplets(torch.randn(8, 4), torch.zeros(8, dtype=torch.long))
    all_distinct = semi_hard_triplets(torch.randn(8, 4), torch.arange(8))
    for result in (one_class, all_distinct):
        assert all(t.numel() == 0 for t in result)


# ----------------------------------------------------------------- stage 1


CASES = [
    # seed, batch, classes, dim_s, dim_t, tau, margin
    (0, 20, 3, 8, 8, 4.0, 0.2),
    (1, 32, 4, 16, 24, 4.0, 0.2),
    (2, 24, 2, 4, 6, 0.5, 0.5),
    (3, 40, 6, 8, 5, 1.0, 0.3),
    (4, 16, 8, 32, 16, 0.25, 1.0),
]


@pytest.mark.parametrize("variant", VARIANTS, indirect=True)
@pytest.mark.parametrize("case", CASES)
def test_relationship_loss_matches_reference_value_and_gradient(variant, case):
    seed, batch, classes, dim_s, dim_t, tau, margin = case
    s, t, y = make_batch(seed, batch, classes, dim_s, dim_t)
    weight = 7.0 if seed % 2 else None
    loss, stats = relationship_loss_with_stats(s, t, y, variant=variant, tau=tau, margin=margin, weight=weight)
    loss.backward()
    grad = s.grad.clone()
    s.grad = None
    ref_weight = weight if weight is not None else DEFAULT_RELATIONSHIP_WEIGHTS[variant]
    ref = relationship_reference(s, t, y.tolist(), variant, tau, margin, ref_weight)
    ref.backward()
    assert stats["tuples"] > 0
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad.double(), s.grad.double(), rtol=1e-4, atol=1e-6 * float(s.grad.abs().max()))


def test_tuples_of_different_sizes_are_not_truncated(tuple_path):
    s, t, y = make_batch(11, 30, 3, 8, 8)
    z = torch.nn.functional.normalize(s.detach(), dim=1)
    a, p, n = semi_hard_triplets(z, y)
    sizes = torch.unique(torch.stack([a, p]), dim=1, return_counts=True)[1]
    assert sizes.min() < sizes.max(), "the case must mix tuple sizes"
    loss, stats = relationship_loss_with_stats(s, t, y)
    assert stats["tuples"] == sizes.numel() and stats["triplets"] == a.numel()
    # Truncating every tuple to the smallest size would change the value.
    ref = relationship_reference(s, t, y.tolist(), "tuple", 4.0, 0.2, 1000.0)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-7)


def test_samples_outside_every_tuple_get_zero_gradient(tuple_path):
    # Rows 0-3 form a tight two-class problem; rows 4-5 are far away (never semi-hard
    # negatives of anything, and their class has a single... no: two members far apart).
    s = torch.tensor(
        [[1.0, 0.0, 0.0], [0.99, 0.1, 0.0], [0.97, 0.0, 0.2], [0.98, -0.1, 0.1], [-1.0, 0.0, 0.0], [0.0, 0.0, -1.0]],
        requires_grad=True,
    )
    t = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 0, 1, 1, 2, 3])  # classes 2 and 3 have no positive pair
    a, p, n = semi_hard_triplets(torch.nn.functional.normalize(s.detach(), dim=1), y)
    used = set(torch.cat([a, p, n]).tolist())
    assert 4 not in used and 5 not in used and a.numel() > 0
    for variant in ("tuple", "triplet"):
        s.grad = None
        relationship_loss(s, t, y, variant=variant).backward()
        assert torch.all(s.grad[4:] == 0)
        assert s.grad[:4].abs().sum() > 0


@pytest.mark.parametrize("variant", VARIANTS, indirect=True)
def test_teacher_gets_no_gradient(variant):
    s, t, y = make_batch(5, 24, 3, 8, 8)
    t.requires_grad_(True)
    relationship_loss(s, t, y, variant=variant).backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0


@pytest.mark.parametrize("variant", VARIANTS, indirect=True)
@pytest.mark.parametrize(
    "labels",
    [torch.zeros(6, dtype=torch.long), torch.arange(6), torch.tensor([0, 1])],
    ids=["one-class", "all-distinct", "tiny"],
)
def test_empty_mining_gives_a_zero_that_backpropagates(variant, labels):
    s = torch.randn(labels.numel(), 4, requires_grad=True)
    t = torch.randn(labels.numel(), 4)
    loss, stats = relationship_loss_with_stats(s, t, labels, variant=variant)
    assert stats == {"tuples": 0, "triplets": 0}
    assert torch.isfinite(loss) and loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_collapsed_embeddings_stay_finite(tuple_path):
    # All student embeddings identical: every distance is 0, nothing is semi-hard.
    s = torch.ones(10, 4, requires_grad=True)
    y = torch.tensor([0, 1] * 5)
    for variant in ("tuple", "triplet"):
        loss = relationship_loss(s, torch.randn(10, 4), y, variant=variant)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", VARIANTS, indirect=True)
def test_half_precision_inputs_are_computed_in_float32(dtype, variant):
    s, t, y = make_batch(7, 48, 4, 16, 16)
    s_half = s.detach().to(dtype).requires_grad_(True)
    loss_half = relationship_loss(s_half, t.to(dtype), y, variant=variant)
    loss_ref = relationship_loss(s_half.detach().float(), t.to(dtype).float(), y, variant=variant)
    assert loss_half.dtype == torch.float32 and torch.isfinite(loss_half)
    torch.testing.assert_close(loss_half, loss_ref)
    loss_half.backward()
    assert s_half.grad.dtype == dtype and torch.isfinite(s_half.grad.float()).all()


@pytest.mark.parametrize("variant", VARIANTS, indirect=True)
def test_autocast_does_not_lower_precision(variant):
    s, t, y = make_batch(8, 48, 4, 16, 16)
    ref = relationship_loss(s, t, y, variant=variant)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = relationship_loss(s, t, y, variant=variant)
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, ref)


@pytest.mark.parametrize("seed", range(12))
def test_fixed_shape_tuple_loss_equals_the_listed_one(seed, monkeypatch):
    # The accelerators' path (every [a, p] slot, masked) against the CPU's (the mined pairs
    # listed): the same tuples and triplets, loss and gradient, on batches with ties
    # (duplicated rows), with single-member classes and of every size up to 200.
    g = torch.Generator().manual_seed(seed)
    batch = int(torch.randint(2, 200, (), generator=g))
    s = torch.randn(batch, 12, generator=g)
    if seed % 3 == 0:
        s[: batch // 3] = s[0]
    t = torch.randn(batch, 20, generator=g)
    y = torch.randint(0, int(torch.randint(1, 40, (), generator=g)), (batch,), generator=g)
    tau, margin = [(4.0, 0.2), (1.0, 0.5), (0.3, 1.5)][seed % 3]
    results = []
    for fixed in (False, True):
        force_fixed_shapes(monkeypatch, fixed)
        x = s.clone().requires_grad_(True)
        loss, stats = relationship_loss_with_stats(x, t, y, tau=tau, margin=margin)
        loss.backward()
        results.append((loss.detach(), x.grad, stats))
    (listed, g_listed, st_listed), (fixed_loss, g_fixed, st_fixed) = results
    assert {k: int(v) for k, v in st_listed.items()} == {k: int(v) for k, v in st_fixed.items()}
    torch.testing.assert_close(fixed_loss, listed, rtol=1e-6, atol=0)
    torch.testing.assert_close(g_fixed, g_listed, rtol=1e-5, atol=1e-6 * float(g_listed.abs().max()))


def test_fixed_shape_tuple_loss_reads_nothing_back_from_the_device():
    # "meta" tensors have shapes but no values: an operation whose output shape or Python
    # value depends on the data (nonzero, boolean indexing, .item(), int(t.max())) raises.
    # The tuple loss runs forward and backward on them: on a GPU it never waits for the
    # device. The triplet variant lists its triplets, so it must read them, and raises.
    s = torch.randn(64, 16, device="meta", requires_grad=True)
    t = torch.randn(64, 32, device="meta")
    y = torch.randint(0, 10, (64,), device="meta")
    loss, stats = relationship_loss_with_stats(s, t, y)
    loss.backward()
    assert loss.shape == () and s.grad.shape == s.shape
    assert stats["tuples"].device.type == stats["triplets"].device.type == "meta"
    with pytest.raises(NotImplementedError, match="nonzero"):
        relationship_loss_with_stats(s, t, y, variant="triplet")


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"tau": 0.0}, "tau"),
        ({"tau": -1.0}, "tau"),
        ({"margin": 0.0}, "margin"),
        ({"weight": -5.0}, "weight"),
        ({"variant": "quadruplet"}, "variant"),
    ],
)
def test_relationship_loss_rejects_bad_arguments(kwargs, name):
    s, t, y = make_batch(0, 8, 2, 4, 4)
    with pytest.raises(ValueError, match=name):
        relationship_loss(s, t, y, **kwargs)


def test_relationship_loss_rejects_mismatched_shapes():
    s, t, y = make_batch(0, 8, 2, 4, 4)
    with pytest.raises(ValueError, match="batch sizes"):
        relationship_loss(s, t[:7], y)
    with pytest.raises(ValueError, match="labels"):
        relationship_loss(s, t, y[:7])
    with pytest.raises(ValueError, match="student_embeddings"):
        relationship_loss(s[0], t, y)
    with pytest.raises(ValueError, match="labels"):
        relationship_loss(s, t, y.float())


# ----------------------------------------------------------------- stage 2


def test_class_centers_match_reference_and_reject_empty_classes():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(30, 6, generator=g)
    labels = torch.arange(30) % 5
    torch.testing.assert_close(class_centers(emb, labels, 5).double(), class_centers_reference(emb, labels, 5))
    assert class_centers(emb.half(), labels, 5).dtype == torch.float32
    with pytest.raises(ValueError, match=r"Classes \[5, 6\] have no sample"):
        class_centers(emb, labels, 7)
    with pytest.raises(ValueError, match="labels"):
        class_centers(emb, labels + 1, 5)


def test_batch_class_centers_fill_absent_classes_with_zeros():
    emb = torch.randn(6, 3)
    labels = torch.tensor([0, 0, 2, 2, 2, 0])
    centers = batch_class_centers(emb, labels, 4)
    assert torch.equal(centers[[1, 3]], torch.zeros(2, 3))
    torch.testing.assert_close(centers[[0, 2]], class_centers(emb, torch.tensor([0, 0, 1, 1, 1, 0]), 2))


def test_ncm_predict_is_cosine_to_centres():
    centers = torch.eye(3)
    emb = torch.tensor([[5.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    assert ncm_predict(emb, centers).argmax(1).tolist() == [0, 2]


@pytest.mark.parametrize("seed,batch,classes,dim,tau,weight", [(0, 16, 6, 8, 2.0, 100.0), (1, 9, 10, 5, 0.7, 3.0)])
@pytest.mark.parametrize("weighted,correct_only", [(False, False), (True, False), (False, True), (True, True)])
def test_local_classifier_loss_matches_reference(seed, batch, classes, dim, tau, weight, weighted, correct_only):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, classes, generator=g, requires_grad=True)
    teacher = torch.randn(batch, dim, generator=g, requires_grad=True)
    centers = torch.nn.functional.normalize(torch.randn(classes, dim, generator=g), dim=1)
    labels = torch.randint(0, classes // 2 + 1, (batch,), generator=g)  # only some classes are local
    inst = torch.rand(batch, generator=g) if weighted else None
    weights = inst  # distilling only where the teacher is right: its 0/1 correctness as weights
    if correct_only:
        right = local_teacher_correct(teacher.detach(), centers, labels).float()
        weights = right if inst is None else inst * right
    loss = local_classifier_loss(logits, teacher, centers, labels, tau=tau, weight=weight, instance_weights=weights)
    loss.backward()
    grad = logits.grad.clone()
    logits.grad = None
    ref = local_classifier_reference(
        logits, teacher.detach(), centers, labels.tolist(), tau, weight, inst, correct_only
    )
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), logits.grad.double(), rtol=1e-4, atol=1e-6)
    assert teacher.grad is None
    absent = sorted(set(range(classes)) - set(labels.tolist()))
    assert torch.all(grad[:, absent] == 0), "non-local classes must not be distilled"
    if correct_only:  # the generated teachers are right on some images and wrong on others
        local_logits = (teacher.detach() @ centers.T).masked_fill(~torch.isin(torch.arange(classes), labels), -1e9)
        wrong = local_logits.argmax(1) != labels
        assert 0 < int(wrong.sum()) < batch
        assert torch.all(grad[wrong] == 0), "images the teacher gets wrong must not be distilled"


def test_local_teacher_correct_matches_a_loop():
    g = torch.Generator().manual_seed(4)
    teacher = torch.randn(20, 6, generator=g)
    centers = torch.nn.functional.normalize(torch.randn(7, 6, generator=g), dim=1)
    labels = torch.randint(0, 4, (20,), generator=g)  # classes 4-6 are not local
    local = sorted(set(labels.tolist()))
    expected = [local[int(torch.stack([teacher[i] @ centers[k] for k in local]).argmax())] == int(labels[i])
                for i in range(20)]  # fmt: skip
    assert local_teacher_correct(teacher, centers, labels).tolist() == expected
    assert 0 < sum(expected) < 20


def test_local_classes_of_a_larger_batch_are_used_for_these_rows():
    """Over several processes each passes its rows with the global batch's local classes
    (`local_classes`): the softmaxes run over those, not over the classes of its rows alone."""
    g = torch.Generator().manual_seed(5)
    logits, teacher = torch.randn(6, 8, generator=g, requires_grad=True), torch.randn(6, 4, generator=g)
    centers = torch.nn.functional.normalize(torch.randn(8, 4, generator=g), dim=1)
    labels, batch_labels = torch.tensor([0, 1, 1, 0, 2, 0]), torch.tensor([0, 1, 1, 0, 2, 0, 5, 6, 5, 2])
    local = local_class_mask(batch_labels, 8)
    loss = local_classifier_loss(logits, teacher, centers, labels, tau=2.0, weight=3.0, local_classes=local)
    ref = local_classifier_reference(logits, teacher, centers, labels.tolist(), 2.0, 3.0, local=[0, 1, 2, 5, 6])
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    alone = local_classifier_loss(logits, teacher, centers, labels, tau=2.0, weight=3.0)
    assert not torch.allclose(alone, loss)  # the rows' own classes (0-2) give another loss
    scores = (teacher @ centers.T)[:, [0, 1, 2, 5, 6]]
    expected = torch.tensor([0, 1, 2, 5, 6])[scores.argmax(1)] == labels
    assert torch.equal(local_teacher_correct(teacher, centers, labels, local_classes=local), expected)
    for bad in (local.long(), local[:7]):
        with pytest.raises(ValueError, match="local_classes"):
            local_classifier_loss(logits, teacher, centers, labels, local_classes=bad)


def test_local_classifier_loss_rejects_bad_input():
    logits, teacher = torch.randn(4, 5), torch.randn(4, 3)
    centers, labels = torch.randn(5, 3), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="labels"):
        local_classifier_loss(logits, teacher, centers, torch.tensor([0, 1, 2, 5]))
    with pytest.raises(ValueError, match="class_centers"):
        local_classifier_loss(logits, teacher, centers[:4], labels)
    with pytest.raises(ValueError, match="class_centers"):
        local_classifier_loss(logits, teacher, torch.randn(5, 4), labels)
    with pytest.raises(ValueError, match="tau"):
        local_classifier_loss(logits, teacher, centers, labels, tau=0)
    with pytest.raises(ValueError, match="weight"):
        local_classifier_loss(logits, teacher, centers, labels, weight=0)
    with pytest.raises(ValueError, match="batch sizes"):
        local_classifier_loss(logits, teacher[:3], centers, labels)
    with pytest.raises(ValueError, match="instance_weights"):
        local_classifier_loss(logits, teacher, centers, labels, instance_weights=torch.ones(3))


def test_local_classifier_loss_in_half_precision():
    g = torch.Generator().manual_seed(3)
    logits, teacher = torch.randn(8, 5, generator=g), torch.randn(8, 4, generator=g)
    centers, labels = torch.nn.functional.normalize(torch.randn(5, 4, generator=g), dim=1), torch.arange(8) % 5
    ref = local_classifier_loss(logits, teacher, centers, labels)
    for dtype in (torch.float16, torch.bfloat16):
        out = local_classifier_loss(logits.to(dtype), teacher.to(dtype), centers, labels)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05)


def test_teacher_confidence_weights_match_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 7, generator=g) * 3
    w = teacher_confidence_weights(logits)
    torch.testing.assert_close(w.double(), confidence_reference(logits))
    assert float(w.max()) == pytest.approx(1.0) and float(w.min()) == pytest.approx(2 / (1 + torch.e.__float__()))
    same = teacher_confidence_weights(torch.zeros(4, 3))
    assert torch.equal(same, torch.ones(4))


# ----------------------------------------------------------------- baselines


def test_kd_loss_matches_reference():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(10, 6, generator=g, requires_grad=True)
    t = torch.randn(10, 6, generator=g, requires_grad=True)
    loss = kd_loss(s, t, tau=3.0)
    loss.backward()
    torch.testing.assert_close(loss.double(), kd_reference(s.detach(), t.detach(), 3.0), rtol=1e-5, atol=1e-6)
    assert t.grad is None
    with pytest.raises(ValueError, match="REFILLED"):
        kd_loss(s, t[:, :5])
    with pytest.raises(ValueError, match="tau"):
        kd_loss(s, t, tau=-1)


@pytest.mark.parametrize("seed,batch,dim_s,dim_t", [(0, 6, 4, 4), (1, 8, 3, 7)])
def test_rkd_loss_matches_reference(seed, batch, dim_s, dim_t):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(batch, dim_s, generator=g, requires_grad=True)
    t = torch.randn(batch, dim_t, generator=g, requires_grad=True)
    loss = rkd_loss(s, t, distance_weight=25.0, angle_weight=50.0)
    loss.backward()
    grad = s.grad.clone()
    s.grad = None
    ref = rkd_reference(s, t, 25.0, 50.0)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), s.grad.double(), rtol=1e-4, atol=1e-6)
    assert t.grad is None


def test_rkd_loss_terms_and_errors():
    s, t = torch.randn(5, 3), torch.randn(5, 3)
    assert rkd_loss(s, s.clone()).item() == pytest.approx(0.0, abs=1e-6)
    only_d = rkd_loss(s, t, angle_weight=0.0)
    only_a = rkd_loss(s, t, distance_weight=0.0)
    torch.testing.assert_close(rkd_loss(s, t), only_d + only_a)
    with pytest.raises(ValueError, match="at least 2"):
        rkd_loss(s[:1], t[:1])
    with pytest.raises(ValueError, match="distance_weight"):
        rkd_loss(s, t, distance_weight=-1)
