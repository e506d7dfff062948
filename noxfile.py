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
    "detection-detr",
    "pose-rtmcc",
    "detection-yolov9",
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
#: The oldest torch and torchvision every package declares (``torch>=2.3``: ``torch.uint16/32/64`` and
#: ``torch.compiler.is_compiling`` appear in 2.3; torchvision 0.18 goes with it). ``nox -s floor`` tests
#: them; numpy < 2 because torch 2.3's wheels were built against numpy 1.
FLOOR_REQUIREMENTS = (
    "torch==2.3.0",
    "torchvision==0.18.0",
    "numpy<2",
    *SHARED_REQUIREMENTS[2:],
)
FLOOR_ENV = SHARED_ENV.with_name(SHARED_ENV.name + "_floor")
#: Where the floor's CPU wheels come from (the default PyPI torch wheel is a CUDA build of several GB).
FLOOR_TORCH_INDEX = os.environ.get("LOSSKIT_FLOOR_TORCH_INDEX", "https://download.pytorch.org/whl/cpu")
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


def _shared_env(session: nox.Session, floor: bool = False) -> str:
    """Create (once) the environment holding torch & co (the floor versions with ``floor``); return its
    site-packages path."""
    env, requirements = (FLOOR_ENV, FLOOR_REQUIREMENTS) if floor else (SHARED_ENV, SHARED_REQUIREMENTS)
    extra = ("--extra-index-url", FLOOR_TORCH_INDEX) if floor else ()
    python = env / "bin" / "python"
    stamp = env / "losskit-requirements.txt"
    wanted = "\n".join(requirements) + "\n"
    if not python.exists():
        session.run(sys.executable, "-m", "venv", str(env), external=True)
    if not stamp.exists() or stamp.read_text() != wanted:
        session.run(str(python), "-m", "pip", "install", "-q", *extra, *requirements, external=True)
        stamp.write_text(wanted)
    return _site_packages(python)


def _install(session: nox.Session, *paths: str, floor: bool = False) -> None:
    """Link the shared torch environment into this session, then install ``paths`` (not editable)."""
    shared = _shared_env(session, floor)
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
    """Core alone: registry, config loader (also from OmegaConf/Hydra), composite, CLI, a test plugin."""
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


#: What each suite of the floor session installs and tests, as the default sessions do.
FLOOR_SUITES = ("core", "ops", *PLUGINS, "integration")


@nox.session(default=False)
@nox.parametrize("suite", FLOOR_SUITES)
def floor(session: nox.Session, suite: str) -> None:
    """The declared floor, torch 2.3 / torchvision 0.18 (CPU wheels, downloaded once): each suite."""
    if suite == "core":
        _install(session, "packages/losskit", TEST_PLUGIN, floor=True)
        _pytest(session, "tests/core")
    elif suite == "ops":
        _install(session, "packages/losskit", "packages/losskit-ops", floor=True)
        _pytest(session, "tests/ops")
    elif suite == "integration":
        _install(session, *_all_packages(), TEST_PLUGIN, floor=True)
        _pytest(session, "tests/integration", plugins=PLUGINS)
    else:
        _install(session, "packages/losskit", *_plugin_paths(suite), floor=True)
        _pytest(session, f"tests/{suite.replace('-', '_')}", plugins=(suite,))


@nox.session(default=False)
def docs(session: nox.Session) -> None:
    """Regenerate docs/reference/ from the criteria's schemas (not part of the default run)."""
    _install(session, *_all_packages())
    session.run("python", "-m", "losskit._refdocs", "docs/reference")
