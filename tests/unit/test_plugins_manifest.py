"""plugins.toml, the entry points in pyproject.toml and each BackendSpec's install hint agree."""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

from lmtier.testing.plugin import MARKERS

ROOT = Path(__file__).resolve().parents[2]


def test_manifest_entry_points_and_install_hints_agree() -> None:
    manifest = tomllib.loads((ROOT / "plugins.toml").read_text())["backends"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    entry_points = dict(project["entry-points"]["lmtier"])
    # lmtier's own value codecs register through the same group, in one plugin of their own
    assert entry_points.pop("codecs") == "lmtier.codecs.plugin"
    extras = project["optional-dependencies"]
    assert set(manifest) == set(entry_points), "every built-in backend needs a manifest entry and an entry point"
    for name, entry in manifest.items():
        assert entry_points[name] == f"lmtier_backends.{name}.plugin"
        module = importlib.import_module(entry_points[name])
        (spec,) = module.lmtier_backend_specs()
        assert spec.name == name
        expected_hint = f"pip install 'lmtier[{entry['extra']}]'" if entry["extra"] else "pip install lmtier"
        assert spec.install_hint == expected_hint, f"{name}: install hint disagrees with plugins.toml"
        if entry["extra"]:
            assert entry["extra"] in extras, f"{name}: extra {entry['extra']!r} missing from pyproject"
        for marker in entry["markers"]:
            assert marker in MARKERS, f"{name}: marker {marker!r} is not registered by lmtier.testing.plugin"
