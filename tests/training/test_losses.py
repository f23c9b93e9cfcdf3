import torch

from transferkit.training.losses import auto_class_weights, masked_head_losses, pseudo_label_loss


def _logits(n, sizes=(3, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"h{i}": torch.randn(n, k, generator=g, requires_grad=True) for i, k in enumerate(sizes)}


def test_each_head_is_scored_only_on_its_own_samples():
    logits = _logits(6)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    heads = torch.tensor([0, 0, 0, 1, 1, 1])
    total, correct = masked_head_losses(logits, labels, heads, ["h0", "h1"], [1.0, 1.0], [None, None])
    ce = torch.nn.functional.cross_entropy
    expected = ce(logits["h0"][:3], labels[:3]) + ce(logits["h1"][3:], labels[3:])
    torch.testing.assert_close(total, expected)
    total.backward()
    assert logits["h0"].grad[3:].abs().sum() == 0  # other head's samples give no gradient
    assert logits["h1"].grad[:3].abs().sum() == 0


def test_a_batch_without_a_dataset_is_fine():
    logits = _logits(4)
    total, _ = masked_head_losses(
        logits, torch.tensor([0, 1, 2, 0]), torch.zeros(4, dtype=torch.long), ["h0", "h1"], [1.0, 5.0], [None, None]
    )
    torch.testing.assert_close(total, torch.nn.functional.cross_entropy(logits["h0"], torch.tensor([0, 1, 2, 0])))


def test_head_weights_scale_losses():
    logits = _logits(4)
    labels, heads = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 0, 1, 1])
    one, _ = masked_head_losses(logits, labels, heads, ["h0", "h1"], [1.0, 0.0], [None, None])
    torch.testing.assert_close(one, torch.nn.functional.cross_entropy(logits["h0"][:2], labels[:2]))


def test_pseudo_labels_kept_only_above_threshold():
    weak = {"h0": torch.tensor([[10.0, 0.0], [0.1, 0.0], [0.0, 9.0]])}
    strong = {"h0": torch.zeros(3, 2, requires_grad=True)}
    loss, keep, pseudo = pseudo_label_loss(weak, strong, torch.zeros(3, dtype=torch.long), ["h0"], 0.95)
    assert keep.tolist() == [True, False, True]
    assert pseudo.tolist() == [0, 0, 1]
    torch.testing.assert_close(loss, torch.tensor(2 * torch.log(torch.tensor(2.0)).item() / 3))
    none, keep0, _ = pseudo_label_loss(weak, strong, torch.zeros(3, dtype=torch.long), ["h0"], 1.0)
    assert not keep0.any() and none.item() == 0.0


def test_auto_class_weights_favour_rare_classes():
    w = auto_class_weights(torch.tensor([0, 0, 0, 1]), 3)
    assert w[1] > w[0] and w[2] == 0


def test_distribution_alignment_pulls_pseudo_labels_towards_the_labelled_prior():
    from transferkit.training.losses import DistributionAlignment

    align = DistributionAlignment([torch.tensor([1.0, 1.0])], momentum=0.0)  # balanced labelled data
    # the model calls almost everything class 0
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.97, 0.03], [0.4, 0.6]])
    mask = torch.ones(4, dtype=torch.bool)
    aligned = align(0, probs, mask)
    torch.testing.assert_close(aligned.sum(1), torch.ones(4))
    assert (aligned[:, 1] > probs[:, 1]).all()  # mass moved to the under-predicted class
    assert aligned[3].argmax() == 1
    # rows of another head are untouched, and a batch without this head leaves the running mean alone
    other = align(0, probs, torch.tensor([True, False, True, False]))
    torch.testing.assert_close(other[1], probs[1])
    before = align.running[0].clone()
    align(0, probs, torch.zeros(4, dtype=torch.bool))
    torch.testing.assert_close(align.running[0], before)


def test_pseudo_label_weight_starts_late_then_ramps():
    from transferkit.training.steps import unlabeled_ramp

    assert unlabeled_ramp(0, 100, start=0.3, rampup=0.2) == 0.0
    assert unlabeled_ramp(29, 100, 0.3, 0.2) == 0.0
    assert unlabeled_ramp(40, 100, 0.3, 0.2) == 0.5
    assert unlabeled_ramp(60, 100, 0.3, 0.2) == 1.0
    assert unlabeled_ramp(0, 100, 0.0, 0.0) == 1.0
