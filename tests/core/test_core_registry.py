# SPDX-License-Identifier: Apache-2.0
"""Plugin discovery: real installed distribution, fakes for the failure paths, autoload switch."""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import pytest

import losskit
from losskit.registry import FIRST_PARTY

PLUGIN_SOURCE = """
from dataclasses import dataclass
import losskit

class {cls}(losskit.Criterion):
    \"\"\"{doc}\"\"\"
    name = {crit!r}

    @dataclass(frozen=True)
    class Config:
        pass

    def forward(self, out, target):
        return out["pred"].sum()

@losskit.hookimpl
def register_criteria(register):
    register({cls})
"""


class FakeDist:
    def __init__(self, name: str, version: str) -> None:
        self.metadata = {"Name": name}
        self.version = version


class FakeEntryPoint:
    """Duck-typed entry point: name, dist, load()."""

    def __init__(self, name: str, module: str, dist: str | None = None, version: str = "1.0") -> None:
        self.name = name
        self.value = module
        self.dist = FakeDist(dist, version) if dist else None

    def load(self) -> Any:
        import importlib

        return importlib.import_module(self.value)


def plugin(
    make_module: Any, module: str, crit: str, cls: str = "Crit", doc: str = "A test criterion."
) -> str:
    return make_module(module, PLUGIN_SOURCE.format(cls=cls, crit=crit, doc=doc))


def test_real_distribution_is_discovered_with_its_metadata() -> None:
    reg = losskit.Registry()
    info = reg.get("charbonnier_loss")
    assert info.distribution == "losskit-charbonnier"
    assert info.version == md.version("losskit-charbonnier") == "0.3.0"
    assert info.plugin == "charbonnier"
    assert info.provider == "losskit-charbonnier 0.3.0"
    assert info.summary.startswith("Charbonnier (robust L1) loss")
    assert reg.failures == []


def test_importing_losskit_scans_no_plugins() -> None:
    code = (
        "import sys, losskit\n"
        "assert 'losskit_charbonnier' not in sys.modules, 'scanned at import'\n"
        "losskit.get_registry().names()\n"
        "assert 'losskit_charbonnier' in sys.modules, 'not scanned on first use'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_discovery_is_cached_per_process() -> None:
    reg = losskit.get_registry()
    assert reg is losskit.get_registry()
    first = reg.get("charbonnier_loss")
    assert reg.get("charbonnier_loss") is first


def test_duplicate_names_from_two_distributions_name_both(make_module: Any) -> None:
    plugin(make_module, "dup_a", "dup_loss")
    plugin(make_module, "dup_b", "dup_loss")
    plugin(make_module, "fine_c", "fine_loss")
    reg = losskit.Registry(
        entry_points=[
            FakeEntryPoint("a", "dup_a", "losskit-a", "1.2"),
            FakeEntryPoint("b", "dup_b", "losskit-b", "3.4"),
            FakeEntryPoint("c", "fine_c", "losskit-c"),
        ]
    )
    with pytest.raises(losskit.CriterionConflictError, match=r"losskit-a 1\.2 and losskit-b 3\.4"):
        reg.get("dup_loss")
    assert "dup_loss" not in reg.names()
    assert reg.get("fine_loss").distribution == "losskit-c"  # the others keep working
    with pytest.raises(losskit.ConfigError, match=r"^\[0\]\.criterion: .*losskit-a 1\.2 and losskit-b 3\.4"):
        losskit.load_config([{"criterion": "dup_loss"}], registry=reg)


def test_plugin_failing_to_import_is_reported_and_others_work(make_module: Any) -> None:
    make_module("broken_plugin", "raise ImportError('needs torch_scatter')\n")
    plugin(make_module, "good_plugin", "good_loss")
    reg = losskit.Registry(
        entry_points=[
            FakeEntryPoint("broken", "broken_plugin", "losskit-broken", "0.9"),
            FakeEntryPoint("good", "good_plugin", "losskit-good"),
        ]
    )
    assert reg.names() == ["good_loss"]
    (failure,) = reg.failures
    assert failure.plugin == "broken"
    assert failure.distribution == "losskit-broken"
    assert (
        str(failure)
        == "plugin 'broken' (losskit-broken 0.9) failed to load: ImportError: needs torch_scatter"
    )
    with pytest.raises(losskit.UnknownCriterionError) as info:
        reg.get("broken_loss")
    message = str(info.value)
    assert "unknown criterion 'broken_loss'" in message
    assert "installed criteria: good_loss" in message
    assert "plugin 'broken' (losskit-broken 0.9) failed to load" in message
    assert isinstance(info.value, LookupError) and not isinstance(info.value, KeyError)


def test_plugin_whose_hook_raises_is_reported(make_module: Any) -> None:
    make_module(
        "raising_plugin",
        """
        import losskit
        @losskit.hookimpl
        def register_criteria(register):
            raise RuntimeError("boom")
        """,
    )
    reg = losskit.Registry(entry_points=[FakeEntryPoint("raising", "raising_plugin", "losskit-raising")])
    assert reg.names() == []
    assert "RuntimeError: boom" in str(reg.failures[0])


def test_misspelled_hookimpl_fails_loudly(make_module: Any) -> None:
    make_module(
        "typo_plugin",
        """
        import losskit
        @losskit.hookimpl
        def register_criterion(register):
            pass
        """,
    )
    plugin(make_module, "ok_plugin", "ok_loss")
    reg = losskit.Registry(
        entry_points=[
            FakeEntryPoint("typo", "typo_plugin", "losskit-typo"),
            FakeEntryPoint("ok", "ok_plugin"),
        ]
    )
    assert reg.names() == ["ok_loss"]
    (failure,) = reg.failures
    assert failure.plugin == "typo" and "register_criterion" in failure.error


def test_registering_a_non_criterion_is_a_plugin_failure(make_module: Any) -> None:
    make_module(
        "bad_register",
        """
        import losskit
        @losskit.hookimpl
        def register_criteria(register):
            register(object)
        """,
    )
    reg = losskit.Registry(entry_points=[FakeEntryPoint("bad", "bad_register")])
    assert "expects a losskit.Criterion subclass" in str(reg.failures[0])


def test_duplicate_entry_point_names_are_reported(make_module: Any) -> None:
    plugin(make_module, "same_a", "loss_a")
    plugin(make_module, "same_b", "loss_b")
    reg = losskit.Registry(
        entry_points=[FakeEntryPoint("same", "same_a", "dist-a"), FakeEntryPoint("same", "same_b", "dist-b")]
    )
    assert reg.names() == ["loss_a"]
    assert "already used by dist-a" in str(reg.failures[0])


def test_autoload_switch(monkeypatch: pytest.MonkeyPatch, make_module: Any) -> None:
    monkeypatch.setenv("LOSSKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert "charbonnier_loss" not in losskit.Registry().names()
    monkeypatch.setenv("LOSSKIT_PLUGINS", "losskit_charbonnier.plugin")
    reg = losskit.Registry()
    assert reg.names() == ["charbonnier_loss"]
    assert reg.get("charbonnier_loss").distribution is None  # loaded by module name, not entry point
    monkeypatch.setenv("LOSSKIT_DISABLE_PLUGIN_AUTOLOAD", "0")
    monkeypatch.delenv("LOSSKIT_PLUGINS")
    assert losskit.Registry().get("charbonnier_loss").distribution == "losskit-charbonnier"


def test_autoload_switch_in_a_fresh_process() -> None:
    code = "import losskit; print(losskit.get_registry().names())"
    env = {"LOSSKIT_DISABLE_PLUGIN_AUTOLOAD": "1", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "[]", out.stderr


def test_register_from_code_and_conflicts(criteria: dict[str, Any]) -> None:
    reg = losskit.Registry(autoload=False)
    reg.register(criteria["scaled_l2"])
    assert reg.get("scaled_l2").plugin == "<code>"
    with pytest.raises(losskit.CriterionConflictError, match="already registered"):
        reg.register(criteria["scaled_l2"])
    reg.register(criteria["scaled_l2"], replace=True)
    reg.register(criteria["scaled_l2"], name="another_name")
    assert reg.names() == ["another_name", "scaled_l2"]


def test_register_criterion_decorator_on_an_injected_registry() -> None:
    reg = losskit.Registry(autoload=False)

    @losskit.register_criterion(registry=reg)
    class NotebookLoss(losskit.Criterion):
        """A notebook's custom loss."""

        name = "notebook_loss"

        @dataclass(frozen=True)
        class Config:
            pass

        def forward(self, out: Any, target: Any) -> Any:
            return out["pred"].mean()

    assert reg.get("notebook_loss").cls is NotebookLoss
    loss = losskit.build_losses([{"criterion": "notebook_loss"}], registry=reg)
    import torch

    assert loss({"pred": torch.ones(3)}, {}).total.item() == 1.0


def test_invalid_criterion_name_is_rejected(criteria: dict[str, Any]) -> None:
    reg = losskit.Registry(autoload=False)
    with pytest.raises(losskit.PluginError, match="not a valid identifier"):
        reg.register(criteria["scaled_l2"], name="bad name")


def test_plugin_manager_is_injectable(criteria: dict[str, Any]) -> None:
    pm = losskit.get_plugin_manager()

    class Plugin:
        @losskit.hookimpl
        def register_criteria(self, register: Any) -> None:
            register(criteria["two_terms"])

    pm.register(Plugin(), name="inline")
    reg = losskit.Registry(pm, autoload=False)
    assert reg.names() == ["two_terms"]
    assert reg.get("two_terms").plugin == "inline"


def test_add_plugin_object(criteria: dict[str, Any]) -> None:
    reg = losskit.Registry(autoload=False)

    class Plugin:
        @losskit.hookimpl
        def register_criteria(self, register: Any) -> None:
            register(criteria["scaled_l2"], name="l2_from_plugin")

    reg.add_plugin(Plugin(), name="mine")
    assert reg.get("l2_from_plugin").plugin == "mine"


@pytest.mark.parametrize("name", sorted(FIRST_PARTY))
def test_first_party_names_say_which_package_to_install(name: str) -> None:
    reg = losskit.Registry(autoload=False)
    with pytest.raises(losskit.UnknownCriterionError) as info:
        reg.get(name)
    assert f"pip install {FIRST_PARTY[name]}" in str(info.value)


def test_unknown_name_suggests_closest_installed(registry: losskit.Registry) -> None:
    with pytest.raises(losskit.UnknownCriterionError) as info:
        registry.get("scaled_l3")
    assert "did you mean 'scaled_l2'?" in str(info.value)
    assert info.value.suggestions == ("scaled_l2",)
