# SPDX-License-Identifier: Apache-2.0
"""Test sessions for the losskit monorepo: ``nox`` runs them all, ``nox --list`` explains each.

Torch is big (~5.5 GB with torchvision), so it is installed once into a shared environment
(``.nox/_torch``, or ``$LOSSKIT_SHARED_ENV``) and every session's own virtualenv sees it through a
``.pth`` file. Each session still installs losskit's distributions into its own virtualenv, so a plugin
session holds only the core and that plugin (plus the plugins it depends on).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
PLUGINS = (
    "classification",
    "detection-yolox",
    "detection-retinanet",
    "segmentation-pidnet",
    "segmentation",
)
#: Distributions below the plugins (no criterion of their own) that a plugin's session also installs.
LIBRARIES = ("ops",)
SHARED_REQUIREMENTS = (
    "torch==2.14.1",
    "torchvision==0.29.1",
    "numpy",
    "scipy",
    "omegaconf",
    "hydra-core",
    "pytest>=8",
    "hypothesis>=6.100",
)
SHARED_ENV = Path(os.environ.get("LOSSKIT_SHARED_ENV", ROOT / ".nox" / "_torch"))
TEST_PLUGIN = "tests/plugins/losskit-charbonnier"

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["core", "ops", "plugin", "integration", "lint"]
nox.options.error_on_missing_interpreters = True


def _site_packages(python: Path | str) -> str:
    import subprocess

    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return subprocess.run(
        [str(python), "-c", code], check=True, capture_output=True, text=True
    ).stdout.strip()


def _shared_env(session: nox.Session) -> str:
    """Create (once) the environment holding torch & co; return its site-packages path."""
    python = SHARED_ENV / "bin" / "python"
    stamp = SHARED_ENV / "losskit-requirements.txt"
    wanted = "\n".join(SHARED_REQUIREMENTS) + "\n"
    if not python.exists():
        session.run(sys.executable, "-m", "venv", str(SHARED_ENV), external=True)
    if not stamp.exists() or stamp.read_text() != wanted:
        session.run(str(python), "-m", "pip", "install", "-q", *SHARED_REQUIREMENTS, external=True)
        stamp.write_text(wanted)
    return _site_packages(python)


def _install(session: nox.Session, *paths: str) -> None:
    """Link the shared torch environment into this session, then install ``paths`` (not editable)."""
    shared = _shared_env(session)
    own = _site_packages(Path(session.virtualenv.location) / "bin" / "python")
    Path(own, "_losskit_shared.pth").write_text(shared + "\n")
    session.install("-q", *paths)


def _pytest(session: nox.Session, *paths: str, plugins: tuple[str, ...] = ()) -> None:
    """Run pytest on ``paths`` plus the isolation check, told which plugins this session installed."""
    env = {"LOSSKIT_EXPECTED_DISTRIBUTIONS": ",".join(f"losskit-{p}" for p in plugins)}
    session.run(
        "python",
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        *paths,
        "tests/isolation",
        *session.posargs,
        env=env,
    )


def _plugin_paths(plugin: str) -> list[str]:
    return [f"packages/losskit-{name}" for name in (*LIBRARIES, plugin)]


def _all_packages() -> list[str]:
    return ["packages/losskit", *(f"packages/losskit-{name}" for name in (*LIBRARIES, *PLUGINS))]


@nox.session
def core(session: nox.Session) -> None:
    """Core alone: registry, config loader, composite, CLI, with a tiny third-party test plugin."""
    _install(session, "packages/losskit", TEST_PLUGIN)
    _pytest(session, "tests/core")


@nox.session
@nox.parametrize("plugin", PLUGINS)
def plugin(session: nox.Session, plugin: str) -> None:
    """One plugin with only the core installed: its tests, parity, and others reported as missing."""
    _install(session, "packages/losskit", *_plugin_paths(plugin))
    _pytest(session, f"tests/{plugin.replace('-', '_')}", plugins=(plugin,))


@nox.session
def ops(session: nox.Session) -> None:
    """losskit-ops alone (with the core): the shared kernels against torchvision and torch."""
    _install(session, "packages/losskit", "packages/losskit-ops")
    _pytest(session, "tests/ops")


@nox.session
def integration(session: nox.Session) -> None:
    """Everything installed: every config in configs/, the CLI main job, docs freshness, DDP example."""
    _install(session, *_all_packages(), TEST_PLUGIN)
    _pytest(session, "tests/integration", plugins=PLUGINS)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff on the whole tree; mypy on every package."""
    _install(
        session,
        "ruff==0.17.6",
        "mypy==2.4.1",
        "types-PyYAML",
        *_all_packages(),
    )
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run(
        "mypy", *(f"packages/{d.name}/src" for d in sorted((ROOT / "packages").iterdir()) if d.is_dir())
    )


@nox.session(default=False)
def docs(session: nox.Session) -> None:
    """Regenerate docs/reference/ from the criteria's schemas (not part of the default run)."""
    _install(session, *_all_packages())
    session.run("python", "-m", "losskit._refdocs", "docs/reference")
