"""Training pieces against hand computation and brute force: anchors, blocks, the packed attention mask, loss terms."""
import math

import torch

from train.blocks import anchor_candidates, block_attention_mask, make_blocks, sample_anchors
from train.losses import combine, expected_acceptance_length, loss_sums, position_weights


def test_anchor_candidates_need_two_supervised_tokens():
    mask = torch.tensor([0, 0, 1, 1, 1, 0, 1, 1])
    assert anchor_candidates(mask).tolist() == [2, 3, 6]
    g = torch.Generator().manual_seed(0)
    picked = sample_anchors(mask, 2, g)
    assert len(picked) == 2 and set(picked.tolist()) <= {2, 3, 6} and picked.tolist() == sorted(picked.tolist())
    assert sample_anchors(mask, 10, g).tolist() == [2, 3, 6]


def test_blocks_labels_and_contiguous_valid_prefix():
    ids = torch.tensor([10, 11, 12, 13, 14, 15, 16])
    mask = torch.tensor([0, 1, 1, 1, 0, 1, 1])
    b = make_blocks(ids, mask, torch.tensor([1, 5]), block_size=3, mask_token_id=99)
    assert b.input_ids.tolist() == [[11, 99, 99], [15, 99, 99]]
    assert b.positions.tolist() == [[1, 2, 3], [5, 6, 7]]
    assert b.labels.tolist() == [[12, 13, 14], [16, 0, 0]]
    # label 14 sits on an unsupervised token; past the end nothing is valid, and validity is a prefix
    assert b.valid.tolist() == [[True, True, False], [True, False, False]]


def brute_force_mask(anchors: list[int], context_len: int, G: int) -> torch.Tensor:
    A = len(anchors)
    mask = torch.zeros(A * G, context_len + A * G, dtype=torch.bool)
    for qa in range(A):
        for qk in range(G):
            row = qa * G + qk
            for j in range(context_len):
                mask[row, j] = j < anchors[qa]
            for ka in range(A):
                for kk in range(G):
                    mask[row, context_len + ka * G + kk] = ka == qa
    return mask


def test_attention_mask_equals_brute_force():
    anchors = [0, 3, 4, 9]
    assert torch.equal(block_attention_mask(torch.tensor(anchors), 12, 3), brute_force_mask(anchors, 12, 3))


def test_position_weights_decay():
    w = position_weights(torch.tensor([[True, True, True, False]]), decay_gamma=4.0)
    assert torch.allclose(w, torch.tensor([[1.0, math.exp(-0.25), math.exp(-0.5), 0.0]]))


def test_loss_terms_hand_computed():
    draft_logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])      # [A=1, G=2, V=3]
    target_probs = torch.tensor([[[0.5, 0.25, 0.25], [0.0, 1.0, 0.0]]])
    labels = torch.tensor([[0, 2]])
    valid = torch.tensor([[True, True]])
    conf_logits = torch.tensor([[0.0, 1.0]])
    s = loss_sums(draft_logits, target_probs, labels, valid, conf_logits, decay_gamma=4.0)

    def softmax(xs):
        e = [math.exp(x) for x in xs]
        return [v / sum(e) for v in e]
    p0, p1 = softmax([2, 0, 0]), softmax([0, 1, 0])
    ce = [-math.log(p0[0]), -math.log(p1[2])]
    l1 = [sum(abs(a - b) for a, b in zip(p0, [0.5, 0.25, 0.25])), sum(abs(a - b) for a, b in zip(p1, [0, 1, 0]))]
    target_c = [1 - 0.5 * v for v in l1]
    sig = [0.5, 1 / (1 + math.exp(-1))]
    bce = [-(t * math.log(s_) + (1 - t) * math.log(1 - s_)) for t, s_ in zip(target_c, sig)]
    w = [1.0, math.exp(-0.25)]
    assert math.isclose(float(s.ce), w[0] * ce[0] + w[1] * ce[1], rel_tol=1e-5)
    assert math.isclose(float(s.l1), w[0] * l1[0] + w[1] * l1[1], rel_tol=1e-5)
    assert math.isclose(float(s.conf), w[0] * bce[0] + w[1] * bce[1], rel_tol=1e-5)
    assert math.isclose(float(s.weight), sum(w), rel_tol=1e-6)
    assert torch.allclose(s.accept_sum, torch.tensor(target_c))
    total = combine(s, float(s.weight), 0.1, 0.9, 1.0)
    expected = (0.1 * float(s.ce) + 0.9 * float(s.l1) + float(s.conf)) / sum(w)
    assert math.isclose(float(total), expected, rel_tol=1e-6)


def test_invalid_positions_carry_no_weight():
    logits = torch.randn(2, 3, 5)
    probs = torch.softmax(torch.randn(2, 3, 5), -1)
    labels = torch.randint(0, 5, (2, 3))
    valid = torch.tensor([[True, False, False], [False, False, False]])
    s = loss_sums(logits, probs, labels, valid, None, 4.0)
    only = loss_sums(logits[:1, :1], probs[:1, :1], labels[:1, :1], valid[:1, :1], None, 4.0)
    assert torch.allclose(s.ce, only.ce) and torch.allclose(s.l1, only.l1) and float(s.conf) == 0


def test_expected_acceptance_length():
    assert math.isclose(expected_acceptance_length(torch.tensor([0.5, 0.5, 0.0])), 1 + 0.5 + 0.25)


def test_vocabulary_loss_equals_full_loss_with_the_rest_masked():
    """Training over a draft vocabulary (K of V columns) is the full-vocabulary loss of a draft whose logits are
    -inf outside it: the same L1/acceptance (the target's outside mass counted in full) and CE on inside labels."""
    g = torch.Generator().manual_seed(0)
    V, ids = 11, torch.tensor([7, 2, 9, 0, 4])
    column = torch.full((V,), -1)
    column[ids] = torch.arange(len(ids))
    logits = torch.randn(3, 4, len(ids), generator=g)
    target = torch.softmax(torch.randn(3, 4, V, generator=g), -1)
    labels = torch.randint(0, V, (3, 4), generator=g)
    labels[0, 0], labels[1, 2] = 7, 3  # one inside, one outside, for sure
    valid = torch.ones(3, 4, dtype=torch.bool)
    conf = torch.randn(3, 4, generator=g)
    full_logits = torch.full((3, 4, V), float("-inf"))
    full_logits[..., ids] = logits
    inside = column[labels] >= 0
    full = loss_sums(full_logits, target, torch.where(inside, labels, ids[0]), valid, conf, 4.0)
    ours = loss_sums(logits, target[..., ids], column[labels], valid, conf, 4.0,
                     outside_mass=1 - target[..., ids].sum(-1))
    assert torch.allclose(ours.l1, full.l1) and torch.allclose(ours.conf, full.conf)
    assert torch.allclose(ours.accept_sum, full.accept_sum)
    ce_full = -full_logits.log_softmax(-1).gather(-1, labels.clamp(max=V - 1)[..., None])[..., 0]
    w = position_weights(valid, 4.0)
    assert torch.allclose(ours.ce, (w * torch.where(inside, ce_full, 0)).sum())
    # negative control: forgetting the target's outside mass overstates acceptance
    blind = loss_sums(logits, target[..., ids], column[labels], valid, conf, 4.0)
    assert float(blind.accept_sum.sum()) > float(ours.accept_sum.sum()) + 0.5
