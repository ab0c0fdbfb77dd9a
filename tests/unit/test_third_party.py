"""A third-party backend package (examples/lmtier-memdict) works exactly like a built-in one.

Its own conformance test runs in-process through pytester; subtly broken variants of it must fail
the relevant conformance tests; it registers programmatically and through an entry point of an
installed distribution; and docs/writing-a-backend.md shows its files verbatim.
"""

from __future__ import annotations

import functools
import re
import sys
import textwrap
import types
from collections.abc import Iterator
from pathlib import Path

import numpy  # noqa: F401  (see below)
import pytest
from prometheus_client import CollectorRegistry

import lmtier.testing.conformance  # noqa: F401  (see below)
from lmtier.cli import main
from lmtier.errors import ConfigError, PluginError
from lmtier.keys import ChunkKey, make_namespace
from lmtier.manager import StorageManager
from lmtier.registry import BackendRegistry, BackendSpec, hookimpl

pytest_plugins = ["pytester"]
# pytester's in-process runs restore sys.modules afterwards: a module first imported inside a run
# would be imported a second time by a later test, and numpy warns about that. Hence the imports
# of numpy and the suite above, before any run.

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "lmtier-memdict"
CONFORMANCE_TEST = EXAMPLE / "tests" / "test_conformance.py"
INI = """\
[pytest]
asyncio_mode = strict
asyncio_default_fixture_loop_scope = function
filterwarnings = error
"""


@pytest.fixture
def example_on_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.syspath_prepend(str(EXAMPLE))
    yield EXAMPLE
    for name in [m for m in sys.modules if m == "lmtier_memdict" or m.startswith("lmtier_memdict.")]:
        del sys.modules[name]  # the next test imports it afresh (from another path, maybe)


def run_suite(pytester: pytest.Pytester, test_source: str, *args: str) -> tuple[set[str], set[str], set[str]]:
    """Run ``test_source`` in-process; return the names of passed, skipped and failed tests."""
    pytester.syspathinsert(EXAMPLE)
    pytester.makeini(INI)
    pytester.makepyfile(test_memdict=test_source)
    reprec = pytester.inline_run("-p", "no:cacheprovider", *args)
    passed, skipped, failed = reprec.listoutcomes()

    def names(reports: list) -> set[str]:
        return {r.nodeid.rsplit("::", 1)[-1] for r in reports}

    assert not reprec.getfailedcollections(), "the test module did not import"
    return names(passed), names(skipped), names(failed)


def test_the_example_package_passes_its_own_conformance_test(pytester: pytest.Pytester) -> None:
    passed, skipped, failed = run_suite(pytester, CONFORMANCE_TEST.read_text())
    assert failed == set()
    assert {"test_results_follow_the_order_of_the_keys", "test_get_into_fills_caller_buffers",
            "test_stats_are_a_flat_dict_of_numbers",
            "test_least_recently_used_values_are_evicted_beyond_max_bytes"} <= passed
    assert skipped == {"test_persistent_backends_keep_data_across_close_and_reopen",
                       "test_shared_backends_see_each_others_writes"}  # memdict claims neither


# Each variant is the example with one subtle bug; the conformance tests named must catch it.
BROKEN = {
    "answers_in_the_wrong_order": (
        """
        class Broken(MemDictBackend):
            async def get(self, keys):  # answers in digest order, not in the order asked
                return await super().get(sorted(keys, key=lambda k: k.digest))
        """,
        {"test_results_follow_the_order_of_the_keys", "test_a_batch_of_many_small_items_round_trips"},
    ),
    "keeps_the_callers_buffer": (
        """
        class Broken(MemDictBackend):
            _freeze = staticmethod(as_bytes_view)  # a view of the caller's buffer instead of a copy
        """,
        {"test_put_does_not_keep_a_reference_to_the_callers_buffer"},
    ),
    "returns_partial_values": (
        """
        class Broken(MemDictBackend):
            # keeps at most 1 MiB, as if a chunked writer dropped its last chunk
            _freeze = staticmethod(lambda value: bytes(as_bytes_view(value)[: 1 << 20]))
        """,
        {"test_put_then_get_returns_the_same_bytes[1048583]",
         "test_a_big_item_round_trips_or_is_refused_with_capacity_error"},
    ),
    "misses_raise_instead_of_returning_none": (
        """
        from lmtier.errors import BackendError

        class Broken(MemDictBackend):
            async def get(self, keys):
                values = await super().get(keys)
                if None in values:
                    raise BackendError("not found")
                return values
        """,
        {"test_get_of_a_missing_key_is_none", "test_delete_removes_and_absent_keys_are_fine"},
    ),
}


@pytest.mark.parametrize("variant", sorted(BROKEN))
def test_a_subtly_broken_backend_fails_the_relevant_conformance_tests(pytester: pytest.Pytester,
                                                                       variant: str) -> None:
    body, must_fail = BROKEN[variant]
    source = "\n".join([
        "import pytest",
        "from lmtier.codec import as_bytes_view",
        "from lmtier.testing import BackendConformance",
        "from lmtier_memdict.backend import MemDictBackend",
        "from lmtier_memdict.config import MemDictConfig",
        textwrap.dedent(body),
        "class TestBroken(BackendConformance):",
        "    big_item_bytes = 8 << 20",
        "    @pytest.fixture",
        "    def backend_factory(self):",
        "        return lambda: Broken(MemDictConfig(max_bytes='32MiB'))",
    ])
    # only the tests that must catch the bug, plus controls that must not (the full suite is slow)
    controls = {"test_empty_batches_return_empty_lists", "test_capabilities_is_a_capabilities_instance"}
    selected = " or ".join(sorted({name.split("[")[0] for name in must_fail | controls}))
    passed, _, failed = run_suite(pytester, source, "-k", selected)
    assert failed == must_fail, f"{variant}: expected {sorted(must_fail)} to fail, failed: {sorted(failed)}"
    assert controls <= passed


def memdict_plugin():
    import lmtier_memdict.plugin

    return lmtier_memdict.plugin


@pytest.mark.asyncio
async def test_registered_programmatically_it_serves_as_a_tier(example_on_path: Path) -> None:
    registry = BackendRegistry.discover()
    registry.register_plugin(memdict_plugin(), name="lmtier-memdict")
    assert "memdict" in registry.names() and registry.origin("memdict") == "lmtier-memdict"
    config = {"tiers": [{"name": "hot", "backend": "cpu", "options": {"max_bytes": "1MiB", "pinned": False}},
                        {"name": "side", "backend": "memdict", "options": {"max_bytes": "1MiB"}}]}
    async with await StorageManager.from_config(config, registry=registry,
                                                metrics_registry=CollectorRegistry()) as mgr:
        ns = make_namespace(test="third-party")
        key = ChunkKey(ns, b"\x01" * 16)
        await mgr.put([(key, b"kv bytes")])
        assert await mgr.tier("side").backend.get([key]) == [b"kv bytes"]
        await mgr.tier("hot").backend.delete([key])
        assert [bytes(v) for v in await mgr.get([key])] == [b"kv bytes"]  # served by memdict
        assert mgr.metrics.registry.get_sample_value("lmtier_tier_hits_total", {"tier": "side"}) == 1


def test_a_duplicate_backend_name_is_refused_naming_both_origins(example_on_path: Path) -> None:
    registry = BackendRegistry()
    registry.register_plugin(memdict_plugin(), name="lmtier-memdict")
    with pytest.raises(PluginError, match=r"'memdict' is provided twice: by lmtier-memdict and by .*other"):
        registry.register(BackendSpec("memdict", "x:y", "x:Z"), origin="other-package")
    with pytest.raises(PluginError, match="provided twice"):  # a second plugin module providing it
        registry.register_plugin(_AnotherMemdict(), name="another-package")
    assert registry.origin("memdict") == "lmtier-memdict"  # the first registration stands


@hookimpl
def _another_memdict_specs() -> list[BackendSpec]:
    return [BackendSpec("memdict", "other.backend:Backend", "other.config:Config")]


# a second installed plugin (any object with hookimpl attributes) that claims the name `memdict`
_AnotherMemdict = functools.partial(types.SimpleNamespace, lmtier_backend_specs=_another_memdict_specs)


def test_its_options_are_validated_by_its_own_model_naming_the_key_path(example_on_path: Path) -> None:
    registry = BackendRegistry()
    registry.register_plugin(memdict_plugin())
    with pytest.raises(ConfigError, match=r"tiers\[1\]\.options\.max_byte: unknown key; allowed keys: max_bytes"):
        registry.validate_options("memdict", {"max_byte": "1MiB"}, path="tiers[1].options")


@pytest.fixture
def installed_example(example_on_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As if `pip install` had run: a dist-info with the example's entry point on sys.path."""
    dist = tmp_path / "site" / "lmtier_memdict-0.1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lmtier-memdict\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[lmtier]\nmemdict = lmtier_memdict.plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))


def test_an_installed_package_is_discovered_through_its_entry_point(installed_example: None,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    registry = BackendRegistry.discover()
    assert registry.origin("memdict") == "entrypoint:memdict"
    assert main(["backends"]) == 0
    assert re.search(r"^memdict\s+entrypoint:memdict\s+yes\s+pip install lmtier-memdict", capsys.readouterr().out,
                     re.MULTILINE)


def test_lmtier_check_backend_runs_the_suite_against_the_installed_package(
    installed_example: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    options = tmp_path / "memdict.yaml"
    options.write_text("max_bytes: 32MiB\n")
    args = ["check-backend", "memdict", "--options", str(options), "--big-item", "4MiB", "-q",
            "-k", "round_trip or order or buffer or persistent"]  # the full suite runs in the first test
    assert main(args) == 0
    out = capsys.readouterr().out
    assert re.search(r"\b7 passed, 1 skipped, 19 deselected", out), out


def test_the_guide_shows_the_example_files_verbatim() -> None:
    guide = (REPO / "docs" / "writing-a-backend.md").read_text()
    shown = re.findall(r"\*\*`examples/lmtier-memdict/([^`]+)`\*\*\n\n```[a-z]*\n(.*?)```", guide, re.DOTALL)
    assert {path for path, _ in shown} >= {"pyproject.toml", "lmtier_memdict/plugin.py",
                                           "lmtier_memdict/config.py", "lmtier_memdict/backend.py",
                                           "tests/test_conformance.py"}
    for path, text in shown:
        assert text == (EXAMPLE / path).read_text(), f"docs/writing-a-backend.md is out of date for {path}"
