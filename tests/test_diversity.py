"""report/diversity.py: the Evci et al. metrics on probability tables small enough to compute
on paper (the numbers are in the comments), its refusals, and a group of one."""

import math

import pytest
import torch

from lightning_lth.errors import LTHError
from lightning_lth.report.diversity import FLOAT16_TINY, diversity

TARGETS = torch.tensor([0, 1])
# three models, two images, two classes; rows are images
THREE = [torch.tensor([[0.9, 0.1], [0.2, 0.8]], dtype=torch.float64),   # predicts 0, 1: acc 1
         torch.tensor([[0.6, 0.4], [0.6, 0.4]], dtype=torch.float64),   # predicts 0, 0: acc 1/2
         torch.tensor([[0.3, 0.7], [0.45, 0.55]], dtype=torch.float64)]  # predicts 1, 1: acc 1/2


def test_three_models_by_hand():
    d = diversity(THREE, [TARGETS] * 3)
    assert d.members == 3
    assert d.acc_mean == pytest.approx(2 / 3)
    # deviations 1/3, -1/6, -1/6: sum of squares 1/6, / (3 - 1), sqrt: 0.288675
    assert d.acc_std == pytest.approx(math.sqrt(1 / 12))
    # mean probabilities: image 0 [0.6, 0.4] -> 0, image 1 [0.41667, 0.58333] -> 1: both right
    assert d.ensemble_acc == 1.0
    # pairs (0,1) differ on image 1, (0,2) on image 0, (1,2) on both: (1/2 + 1/2 + 1) / 3
    assert d.disagreement == pytest.approx(2 / 3)
    # KL(i||j), mean over the two images, e.g. (0||1): image 0 0.9 ln(0.9/0.6) + 0.1 ln(0.1/0.4)
    # = 0.226278, image 1 0.2 ln(0.2/0.6) + 0.8 ln(0.8/0.4) = 0.334807; mean 0.280542.
    # All six ordered pairs: (0||1) 0.280542, (0||2) 0.465864, (1||0) 0.346574, (1||2) 0.118635,
    # (2||0) 0.595695, (2||1) 0.114740; mean 0.320342
    assert d.kl == pytest.approx(0.320342, abs=1e-6)
    # JS per unordered pair (mean over images): (0,1) 0.074796, (0,2) 0.120674,
    # (1,2) 0.028761; mean 0.074744
    assert d.js == pytest.approx(0.074744, abs=1e-6)
    # m = 1: the members' mean 2/3; m = 2: {0,1} 1, {0,2} 1, {1,2} (image 0 [0.45, 0.55] -> 1,
    # image 1 [0.525, 0.475] -> 0: both wrong) 0, so 2/3; m = 3: the ensemble, 1
    assert d.ensemble_by_size == pytest.approx((2 / 3, 2 / 3, 1.0))


def test_kl_is_over_ordered_pairs_and_clamps_a_float16_zero():
    # p = [1, 0] and q = [1/2, 1/2] on one image, stored as float16 (p's 0 is exact).
    # KL(p||q) = 1 ln 2 = ln 2; KL(q||p) = 1/2 ln(1/2 / 2^-24) + 1/2 ln(1/2 / 1) = 11 ln 2:
    # the mean of the ordered pairs is 6 ln 2, finite. JS: m = [3/4, 1/4],
    # H(m) - (H(p) + H(q)) / 2 = 0.562335 - (0 + ln 2) / 2 = 0.215762 (no clamp involved).
    p = torch.tensor([[1.0, 0.0]], dtype=torch.float16)
    q = torch.tensor([[0.5, 0.5]], dtype=torch.float16)
    d = diversity([p, q], [torch.tensor([0])] * 2)
    assert FLOAT16_TINY == 2.0 ** -24
    assert d.kl == pytest.approx(6 * math.log(2))
    assert d.js == pytest.approx(0.215762, abs=1e-6)
    assert d.disagreement == 0.0  # q's tie goes to the first class, as p's argmax
    assert (d.acc_mean, d.acc_std, d.ensemble_acc) == (1.0, 0.0, 1.0)


def test_identical_models_do_not_differ_and_rows_are_renormalised():
    a = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    # float16 rows that sum to 0.998 or 1.002 are divided by their sums: still the same model
    d = diversity([a, a * 0.998, a * 1.002], [torch.tensor([0, 1])] * 3)
    assert (d.disagreement, d.acc_mean, d.acc_std, d.ensemble_acc) == (0.0, 0.5, 0.0, 0.5)
    assert d.kl == pytest.approx(0.0, abs=1e-12) and d.js == pytest.approx(0.0, abs=1e-12)


def test_a_group_of_one_has_no_pairwise_metrics():
    d = diversity(THREE[:1], [TARGETS])
    assert (d.members, d.acc_mean, d.ensemble_acc, d.ensemble_by_size) == (1, 1.0, 1.0, (1.0,))
    assert (d.acc_std, d.disagreement, d.kl, d.js) == (None, None, None, None)


@pytest.mark.parametrize("probs, targets, message", [
    (THREE[:2], [TARGETS, torch.tensor([1, 0])], "model 1's targets differ from model 0's"),
    ([THREE[0], torch.full((2, 3), 1 / 3)], [TARGETS] * 2, "model 1's probabilities have shape"),
    ([THREE[0], torch.full((3, 2), 0.5)], [TARGETS, torch.tensor([0, 1, 1])],
     "expected [2, C]"),
    (THREE[:1], [TARGETS, TARGETS], "1 probability tensors but 2 targets"),
    ([], [], "at least one model"),
    (THREE[:1], [torch.tensor([0.0, 1.0])], "1-D integer tensor"),
    (THREE[:1], [torch.tensor([0, 2])], "targets must lie in [0, 2)"),
    ([torch.tensor([[0.5, float("nan")], [0.5, 0.5]])], [TARGETS], "non-finite"),
])
def test_refusals_are_one_line(probs, targets, message):
    with pytest.raises(LTHError) as err:
        diversity(probs, targets)
    assert message in str(err.value) and "\n" not in str(err.value)
