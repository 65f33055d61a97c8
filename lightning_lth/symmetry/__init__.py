"""Weight symmetry: permutation specs, matching (activation / weight) and mode connectivity.

    spec = get_spec(model, example_input=x)     # declared (permutation_spec()) or derived
    check_spec(model, spec)                     # LTHError unless permutations keep the function
    pi = match(model_a, model_b, spec, method="activation", batches=train_loader,
               num_batches=None)                # {group: LongTensor}, pi(A) aligns with B
    state = apply_permutation(model_a.state_dict(), spec, pi)
    mask_b = apply_permutation(mask_a, spec, pi)  # a new Mask, same meta
"""

from lightning_lth.symmetry.connectivity import (
    barrier,
    compare_naive_matched,
    evaluate,
    has_batchnorm,
    interpolate_state,
    interpolation_curve,
    recompute_bn_stats,
)
from lightning_lth.symmetry.matching import METHODS, activation_match, match, weight_match
from lightning_lth.symmetry.spec import (
    MatchPoint,
    PermutationSpec,
    apply_permutation,
    check_spec,
    identity_permutation,
    invert_permutation,
    random_permutation,
)
from lightning_lth.symmetry.trace import derive_spec, get_spec, skip_path_convs

__all__ = [
    "METHODS",
    "MatchPoint",
    "PermutationSpec",
    "activation_match",
    "apply_permutation",
    "barrier",
    "check_spec",
    "compare_naive_matched",
    "derive_spec",
    "evaluate",
    "get_spec",
    "has_batchnorm",
    "identity_permutation",
    "interpolate_state",
    "interpolation_curve",
    "invert_permutation",
    "match",
    "random_permutation",
    "recompute_bn_stats",
    "skip_path_convs",
    "weight_match",
]
