"""The one dispatch point for the decode kernels.

Each function here picks the fastest available implementation for its inputs and otherwise runs the
pure-torch reference in :mod:`kvpack.kernels.reference`.
"""

from __future__ import annotations

from . import reference

__all__ = ["kivi_key_scores", "qjl_key_scores", "value_weighted_sum", "reference"]


def kivi_key_scores(query, codes, scale, zero, bits):
    """See :func:`kvpack.kernels.reference.kivi_key_scores`."""
    return reference.kivi_key_scores(query, codes, scale, zero, bits)


def value_weighted_sum(weights, codes, scale, zero, bits, group_size):
    """See :func:`kvpack.kernels.reference.value_weighted_sum`."""
    return reference.value_weighted_sum(weights, codes, scale, zero, bits, group_size)


def qjl_key_scores(query, sketch, outlier_idx, signs, norms, outlier_signs, outlier_norms):
    """See :func:`kvpack.kernels.reference.qjl_key_scores`."""
    return reference.qjl_key_scores(query, sketch, outlier_idx, signs, norms, outlier_signs, outlier_norms)
