"""The data package's contract, pinned where the behaviour tests leave room: exact refusals, edge values, the
error paths of the readers and the loaders' bookkeeping. Written against the survivors of mutation testing
(``python scripts/mutation.py fsam/data``): each test states a behaviour that one of them broke unnoticed.
"""

from __future__ import annotations

import pytest

from fsam.data import AugmentSpec, NoiseSpec
from fsam.data.seeding import derive_seed, generator
from fsam.errors import ConfigError


def test_derived_seeds_are_63_bit_deterministic_and_differ_in_every_part():
    seeds = {derive_seed(1, 2, 3), derive_seed(1, 2, 4), derive_seed(2, 2, 3), derive_seed(1, 2), derive_seed(3, 2, 1)}
    assert len(seeds) == 5
    assert all(0 <= seed < 2**63 for seed in seeds)
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3)
    assert max(seeds) >= 2**40  # both 32-bit words are used, not only the low one
    assert generator(5, 1).initial_seed() == derive_seed(5, 1)


@pytest.mark.parametrize(("spec", "message"), [
    (lambda: AugmentSpec(crop=1), "dataset.augment.crop=1 is not allowed: must be true or false"),
    (lambda: AugmentSpec(normalize="yes"), "dataset.augment.normalize='yes' is not allowed: must be true or false"),
    (lambda: AugmentSpec(padding=-1), "dataset.augment.padding=-1 is not allowed: must be a whole number >= 0"),
    (lambda: AugmentSpec(padding=True), "dataset.augment.padding=True is not allowed: must be a whole number >= 0"),
    (lambda: AugmentSpec(cutout_size=2.0), "dataset.augment.cutout_size=2.0 is not allowed: must be a whole number"),
    (lambda: AugmentSpec(cutout_prob=1.5), "dataset.augment.cutout_prob=1.5 is not allowed: must be in [0, 1]"),
    (lambda: AugmentSpec(cutout_prob=-0.1), "dataset.augment.cutout_prob=-0.1 is not allowed: must be in [0, 1]"),
    (lambda: AugmentSpec(cutout_prob=False), "dataset.augment.cutout_prob=False is not allowed: must be in [0, 1]"),
    (lambda: NoiseSpec(kind="pair"), "dataset.noise.kind='pair' is not allowed: use one of none, symmetric, "
                                     "asymmetric"),
    (lambda: NoiseSpec(ratio="0.2"), "dataset.noise.ratio='0.2' is not allowed: must be in [0, 1]"),
    (lambda: NoiseSpec(seed=-3), "dataset.noise.seed=-3 is not allowed: must be a whole number >= 0"),
])
def test_bad_specs_are_refused_in_words_that_name_the_key_the_value_and_the_rule(spec, message):
    with pytest.raises(ConfigError) as error:
        spec()
    assert str(error.value).startswith(message)


def test_the_edges_of_every_range_are_allowed():
    AugmentSpec(padding=0, cutout_size=0, cutout_prob=0.0)
    AugmentSpec(cutout_prob=1.0)
    AugmentSpec(cutout_prob=1)
    NoiseSpec(kind="symmetric", ratio=1.0, seed=0)
    NoiseSpec(kind="asymmetric", ratio=0)
