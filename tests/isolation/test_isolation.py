# SPDX-License-Identifier: Apache-2.0
"""Which first-party plugins this environment holds, and that the others are reported as not installed.

nox runs this file in every session and sets ``LOSSKIT_EXPECTED_DISTRIBUTIONS`` to the plugin
distributions it installed there (empty for the core session), so each plugin session proves that the
plugin works alone and that the other plugins' criteria are reported with the package to install.
Outside nox the expectation is read from the installed distributions.
"""

from __future__ import annotations

import importlib.metadata as md
import os

import pytest

import losskit
from losskit.registry import FIRST_PARTY
from losskit.schema import required_examples

DISTRIBUTIONS = sorted(set(FIRST_PARTY.values()))
#: Fields a criterion cannot be built without (they have no default), for the ones that have any.


def _installed(dist: str) -> bool:
    try:
        md.distribution(dist)
    except md.PackageNotFoundError:
        return False
    return True


def expected() -> set[str]:
    env = os.environ.get("LOSSKIT_EXPECTED_DISTRIBUTIONS")
    if env is None:
        return {d for d in DISTRIBUTIONS if _installed(d)}
    return {d for d in env.split(",") if d}


def test_environment_holds_exactly_the_expected_plugins() -> None:
    assert {d for d in DISTRIBUTIONS if _installed(d)} == expected()


@pytest.mark.parametrize("name", sorted(FIRST_PARTY))
def test_each_first_party_criterion_is_found_or_reported_missing(name: str) -> None:
    dist = FIRST_PARTY[name]
    registry = losskit.Registry()
    if dist in expected():
        info = registry.get(name)
        assert info.distribution == dist
        assert info.version == md.version(dist)
        losskit.build_losses([{"criterion": name, **required_examples(info.cls.Config)}], registry=registry)
    else:
        assert name not in registry
        with pytest.raises(losskit.ConfigError) as error:
            losskit.build_losses(f"model:\n  losses:\n    - criterion: {name}\n", registry=registry)
        assert str(error.value) == (
            f"line 3: model.losses[0].criterion: criterion {name!r} is not installed; it is provided by "
            f"{dist}: pip install {dist}; installed criteria: {', '.join(registry.names()) or 'none'}"
        )
    assert registry.failures == []
