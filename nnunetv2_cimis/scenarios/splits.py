"""How a scenario's cases are split: seeded, disjoint patient subsets per step plus a held-out test set
(:func:`split_cases`), and the cross-validation split file nnU-Net trains from (:func:`write_splits`, written into
a step dataset's preprocessed folder by ``nnUNetv2_cimis_make_scenario`` and ``nnUNetv2_cimis_add_classes``)."""
from __future__ import annotations

import json
import os
from typing import List, Sequence

import numpy as np

from nnunetv2_cimis.errors import CIMISError


def split_cases(cases: Sequence[str], num_steps: int, test_fraction: float, seed: int,
                min_per_step: int = 2) -> (List[List[str]], List[str]):
    """Seeded, disjoint patient subsets: ``num_steps`` training subsets and a test set.

    Raises CIMISError when a step would get fewer than ``min_per_step`` cases.
    """
    if not 0 < test_fraction < 1:
        raise CIMISError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    order = list(np.random.RandomState(seed).permutation(sorted(cases)))
    n_test = max(1, int(round(test_fraction * len(order))))
    test, rest = order[:n_test], order[n_test:]
    if len(rest) < num_steps * min_per_step:
        raise CIMISError(
            f"The dataset has {len(cases)} cases: {n_test} go to the test set and {len(rest)} remain for {num_steps} "
            f"steps, but every step needs at least {min_per_step} cases (one to train, one to validate). Use a "
            f"larger dataset, fewer steps or a smaller --test-fraction.")
    subsets = [list(map(str, s)) for s in np.array_split(np.array(rest, dtype=object), num_steps)]
    return [sorted(s) for s in subsets], sorted(map(str, test))


def write_splits(preprocessed_folder: str, cases: Sequence[str], seed: int = 12345) -> None:
    """nnU-Net's 5-fold split when there are at least 5 cases, else one fold holding out one case."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    cases = sorted(cases)
    if len(cases) >= 5:
        splits = generate_crossval_split(cases, seed=seed, n_splits=5)
    else:
        splits = [{"train": cases[:-1], "val": cases[-1:]}]
    with open(os.path.join(preprocessed_folder, "splits_final.json"), "w") as f:
        json.dump(splits, f, indent=2)
