"""A third-party backend package (examples/lmtier-memdict) works exactly like a built-in one.

Its own conformance test runs through pytester in a fresh interpreter; subtly broken variants of it
must fail the relevant conformance tests; it registers programmatically and through an entry point of an
installed distribution; and docs/writing-a-backend.md shows its files verbatim.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import shutil
import subprocess
import sys
import textwrap
import types
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

import pytest
from prometheus_client import CollectorRegistry

from lmtier.cli import main
from lmtier.errors import ConfigError, PluginError
from lmtier.keys import ChunkKey, make_namespace
from lmtier.manager import StorageManager
from lmtier.registry import BackendRegistry, BackendSpec, hookimpl

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "lmtier-memdict"
CONFORMANCE_TEST = EXAMPLE / "tests" / "test_conformance.py"
INI = """\
[pytest]
asyncio_mode = strict
asyncio_default_fixture_loop_scope = function
filterwarnings = error
timeout = 120
timeout_method = thread
"""


@pytest.fixture
def example_on_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.syspath_prepend(str(EXAMPLE))
    yield EXAMPLE
    for name in [m for m in sys.modules if m == "lmtier_memdict" or m.startswith("lmtier_memdict.")]:
        del sys.modules[name]  # the next test imports it afresh (from another path, maybe)


@dataclasses.dataclass
class SuiteRun:
    """What one pytest run of a generated test module did, read from its JUnit XML."""

    ret: int
    passed: set[str]
    skipped: set[str]
    failed: dict[str, str]  # test name -> its failure or error report (teardown errors included)


def run_suite(pytester: pytest.Pytester, test_source: str, *args: str, package: Path = EXAMPLE,
              module: str = "test_memdict") -> SuiteRun:
    """Run ``test_source`` with pytest in a fresh interpreter, ``package`` importable.

    Not in-process: an inline run shares this process's garbage, threads and host pools, so a
    ResourceWarning from another test's leftovers met the inner run's ``filterwarnings = error``
    (an INTERNALERROR, seen once on CI) and a deliberately leaky inner backend tripped this
    session's own leak check.
    """
    pytester.makeini(INI)
    pytester.makepyfile(**{module: test_source})
    report = pytester.path / "junit.xml"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(package), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    # A test stuck in the inner run gets every thread's stack dumped (timeout_method = thread in
    # INI) and the run ends there, so the outer assert below shows where it hung.
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--junitxml={report}", *args],
                          cwd=pytester.path, env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode in (0, 1, 5) and report.exists(), \
        f"pytest exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    run = SuiteRun(done.returncode, set(), set(), {})
    for case in ElementTree.parse(report).iter("testcase"):
        name, problems = case.get("name", ""), case.findall("failure") + case.findall("error")
        assert case.get("classname") or not problems, f"the test module did not import: {done.stdout}"
        if problems:
            run.failed[name] = "\n".join(f"{e.get('message', '')}\n{e.text or ''}" for e in problems)
        elif case.find("skipped") is not None:
            run.skipped.add(name)
        else:
            run.passed.add(name)
    return run


def test_the_example_package_passes_its_own_conformance_test(pytester: pytest.Pytester) -> None:
    run = run_suite(pytester, CONFORMANCE_TEST.read_text())
    passed, skipped = run.passed, run.skipped
    assert run.failed == {}
    assert {"test_results_follow_the_order_of_the_keys", "test_get_into_fills_caller_buffers",
            "test_stats_are_a_flat_dict_of_numbers",
            "test_least_recently_used_values_are_evicted_beyond_max_bytes"} <= passed
    claims = {"test_persistent_backends_keep_data_across_close_and_reopen",
              "test_shared_backends_see_each_others_writes",  # memdict claims neither
              "test_allocated_buffers_are_writable_exact_and_adopted_by_put",  # nor these protocols
              "test_an_allocation_larger_than_the_tier_is_a_capacity_error",
              "test_the_eviction_listener_sees_each_evicted_value_before_its_memory_is_reused"}
    scenarios = {name.split("[")[0] for name in skipped - claims}
    assert claims <= skipped and scenarios == {  # no back doors: memdict stores no bytes outside the process
        "test_a_damaged_value_is_a_miss_and_is_deleted", "test_a_damaged_value_is_a_get_into_miss_and_is_deleted",
        "test_two_swapped_values_are_misses_and_are_deleted", "test_a_value_of_a_newer_format_is_a_miss_left_in_place",
        "test_a_newer_format_value_a_new_handle_finds_is_not_counted",
        "test_a_value_stored_in_format_version_1_is_still_read",
        "test_a_stopped_service_fails_fast_and_typed_then_works_again",
        "test_a_key_the_store_cannot_read_is_a_miss_and_the_batch_serves_the_others"}
    assert "test_clear_drops_the_values_of_the_namespaces_named_or_every_value" in passed


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
    "claims_persistence_it_lacks": (
        """
        import dataclasses

        class Broken(MemDictBackend):
            @property
            def capabilities(self):
                return dataclasses.replace(super().capabilities, persistent=True)
        """,
        {"test_persistent_backends_keep_data_across_close_and_reopen"},
    ),
    "a_second_aclose_raises": (
        """
        class Broken(MemDictBackend):
            async def aclose(self):
                if self._closed:
                    raise RuntimeError("already closed")
                await super().aclose()
        """,
        {"test_a_closed_backend_refuses_or_forgets_and_aclose_is_idempotent",
         "test_async_with_closes_the_backend"},
    ),
    "async_with_does_not_close": (
        """
        class Broken(MemDictBackend):
            async def __aexit__(self, *exc_info):  # forgets to close
                pass
        """,
        {"test_async_with_closes_the_backend"},
    ),
    "a_closed_backend_raises_other_errors": (
        """
        class Broken(MemDictBackend):
            def _check_open(self):
                if self._closed:
                    raise RuntimeError("closed")  # not an LmtierError: the manager cannot degrade it
        """,
        {"test_a_closed_backend_refuses_or_forgets_and_aclose_is_idempotent"},
    ),
    "keeps_deleted_keys": (
        """
        class Broken(MemDictBackend):
            async def delete(self, keys):  # forgets to delete
                self._check_open()
        """,
        {"test_delete_removes_and_absent_keys_are_fine"},
    ),
    "exposes_half_written_values": (
        """
        import asyncio

        class Broken(MemDictBackend):
            async def put(self, items):  # writes in two halves, yielding to other tasks between
                for key, value in items:
                    data = bytearray(as_bytes_view(value))
                    half = bytearray(len(data))
                    half[: len(data) // 2] = data[: len(data) // 2]
                    self._data[key] = half
                    await asyncio.sleep(0)
                    half[len(data) // 2 :] = data[len(data) // 2 :]
        """,
        {"test_concurrent_put_and_get_never_see_a_partial_value"},
    ),
    "get_into_writes_after_a_cancellation": (
        """
        import asyncio
        import threading

        class Broken(MemDictBackend):
            def __init__(self, config):
                super().__init__(config)
                self._pending = []

            async def get_into(self, keys, outs):
                views = [as_bytes_view(o) for o in outs]
                values = [self._data.get(k) for k in keys]
                gate = threading.Event()

                def transfer():  # the copy a worker thread makes once released
                    gate.wait()
                    for view, value in zip(views, values):
                        if value is not None and len(value) == view.nbytes:
                            view[:] = value

                worker = threading.Thread(target=transfer)
                worker.start()
                self._pending.append((gate, worker))
                await asyncio.sleep(0)  # a cancellation here leaves the transfer pending
                gate.set()
                await asyncio.to_thread(worker.join)
                return [v is not None and len(v) == o.nbytes for v, o in zip(values, views)]

            async def aclose(self):
                for gate, worker in self._pending:  # pending transfers finish now, writing as they go
                    gate.set()
                    worker.join()
                await super().aclose()
        """,
        {"test_a_cancelled_get_into_writes_nothing_after_it_has_unwound"},
    ),
}


@pytest.mark.parametrize("variant", sorted(BROKEN))
def test_a_subtly_broken_backend_fails_the_relevant_conformance_tests(pytester: pytest.Pytester,
                                                                       variant: str) -> None:
    body, must_fail = BROKEN[variant]
    source = "\n".join([
        "import pytest",
        "from lmtier.buffers import as_bytes_view",
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
    run = run_suite(pytester, source, "-k", selected)
    assert set(run.failed) == must_fail, f"{variant}: expected {sorted(must_fail)} to fail, failed: {run.failed}"
    assert controls <= run.passed


def test_the_suite_fails_loudly_when_backend_factory_is_not_overridden(pytester: pytest.Pytester) -> None:
    source = "from lmtier.testing import BackendConformance\n\n\nclass TestForgot(BackendConformance):\n    pass\n"
    run = run_suite(pytester, source, "-k", "empty_batches or capabilities_is_a")
    assert run.passed == set() and run.skipped == set() and len(run.failed) == 2
    for report in run.failed.values():
        assert "TestForgot must override the `backend_factory` fixture" in report


def test_the_suite_is_not_collected_by_itself(pytester: pytest.Pytester) -> None:
    run = run_suite(pytester, "from lmtier.testing import BackendConformance  # noqa: F401\n")
    assert run.ret == pytest.ExitCode.NO_TESTS_COLLECTED
    assert (run.passed, run.skipped, run.failed) == (set(), set(), {})


def test_the_suite_fails_a_backend_that_leaves_host_buffers_out_after_aclose(pytester: pytest.Pytester) -> None:
    source = textwrap.dedent("""
        import pytest
        from lmtier.testing import BackendConformance
        from lmtier_backends.cpu.backend import CpuBackend
        from lmtier_backends.cpu.config import CpuConfig

        class Leaky(CpuBackend):
            async def aclose(self):  # closes its pool but never releases the stored entries
                self._closed = True
                self.pool.close()

        class TestLeaky(BackendConformance):
            @pytest.fixture
            def backend_factory(self):
                return lambda: Leaky(CpuConfig(max_bytes="4MiB", pinned=False))
        """)
    run = run_suite(pytester, source, "-k", "put_then_get or empty_batches")
    assert "test_empty_batches_return_empty_lists" in run.passed
    assert len(run.failed) == 3  # the 3 sizes of put_then_get, each failing its teardown:
    assert all("failed on teardown" in report and "backend left host buffers outstanding after aclose()" in report
               for report in run.failed.values())


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
    assert re.search(rf"\b6 passed, 2 skipped, {suite_size()[0] - 8} deselected", out), out


def test_the_guide_shows_the_example_files_verbatim() -> None:
    guide = (REPO / "docs" / "writing-a-backend.md").read_text()
    shown = re.findall(r"\*\*`examples/(lmtier-[a-z]+/[^`]+)`\*\*\n\n```[a-z]*\n(.*?)```", guide, re.DOTALL)
    assert {path for path, _ in shown} >= {
        "lmtier-memdict/pyproject.toml", "lmtier-memdict/lmtier_memdict/plugin.py",
        "lmtier-memdict/lmtier_memdict/config.py", "lmtier-memdict/lmtier_memdict/backend.py",
        "lmtier-memdict/tests/test_conformance.py", "lmtier-filedir/lmtier_filedir/backend.py",
        "lmtier-filedir/tests/test_conformance.py"}
    for path, text in shown:
        assert text == (REPO / "examples" / path).read_text(), f"docs/writing-a-backend.md is out of date for {path}"


def test_the_kit_example_passes_the_suite_with_its_corruption_scenarios(pytester: pytest.Pytester) -> None:
    filedir = REPO / "examples" / "lmtier-filedir"
    run = run_suite(pytester, (filedir / "tests" / "test_conformance.py").read_text(), package=filedir,
                    module="test_filedir")
    assert run.failed == {}
    names = {name.split("[")[0] for name in run.passed}
    assert {"test_a_damaged_value_is_a_miss_and_is_deleted", "test_two_swapped_values_are_misses_and_are_deleted",
            "test_a_value_of_a_newer_format_is_a_miss_left_in_place",
            "test_a_newer_format_value_a_new_handle_finds_is_not_counted",
            "test_a_value_stored_in_format_version_1_is_still_read"} <= names


# -- a real `pip install` of the package, used from fresh processes --------------------------------
def pip_install(source: Path, target: Path) -> None:
    """Build and install ``source`` into ``target`` offline, as `pip install` does (a wheel, a
    dist-info with the package's own entry points)."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def pip_installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The example installed as is, and a copy whose put keeps (a view of) the caller's buffer."""
    root = tmp_path_factory.mktemp("pip")
    good, bad = root / "src-good", root / "src-bad"
    shutil.copytree(EXAMPLE, good, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    shutil.copytree(good, bad)
    backend = bad / "lmtier_memdict" / "backend.py"
    text = backend.read_text()
    assert "return bytes(as_bytes_view(value))" in text
    backend.write_text(text.replace("return bytes(as_bytes_view(value))", "return as_bytes_view(value)"))
    sites = {"good": root / "site-good", "bad": root / "site-bad"}
    pip_install(good, sites["good"])
    pip_install(bad, sites["bad"])
    return sites


def suite_size() -> tuple[int, int]:
    """How many tests one BackendConformance subclass runs (parametrized cases counted), and how
    many of them are fault scenarios (they need the ``raw_store`` or ``service`` back door)."""
    import inspect

    from lmtier.testing import BackendConformance

    n = scenarios = 0
    for name, fn in vars(BackendConformance).items():
        if name.startswith("test_"):
            params = [m for m in getattr(fn, "pytestmark", []) if m.name == "parametrize"]
            cases = len(params[0].args[1]) if params else 1
            n += cases
            if {"raw_store", "service"} & set(inspect.signature(fn).parameters):
                scenarios += cases
    return n, scenarios


def assert_all_passed(output: str, expected: tuple[int, int], *, skipped: int) -> None:
    """The whole suite ran and nothing failed: every scenario skipped (no back doors), and
    ``skipped`` more (capabilities the backend does not claim)."""
    total, scenarios = expected
    # (a PytestAssertRewriteWarning is possible: lmtier comes from this checkout, not the venv's install)
    match = re.search(r"\b(\d+) passed, (\d+) skipped(?:, \d+ warnings?)? in", output)
    assert match and "failed" not in output, output
    assert (int(match.group(1)), int(match.group(2))) == (total - scenarios - skipped, scenarios + skipped), output


def run_installed(site: Path, cwd: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    # the package from `site`, and lmtier from this checkout (the venv's editable install may
    # point at another one)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("LMTIER_DISABLE_PLUGIN_AUTOLOAD", None)
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=280, cwd=cwd, env=env)


def test_a_pip_installed_package_passes_the_whole_suite_through_lmtier_check_backend(
    pip_installed: dict[str, Path], tmp_path: Path
) -> None:
    options = tmp_path / "memdict.yaml"
    options.write_text("max_bytes: 96MiB\n")
    lmtier = str(Path(sys.executable).parent / "lmtier")
    listed = run_installed(pip_installed["good"], tmp_path, lmtier, "backends")
    assert re.search(r"^memdict\s+entrypoint:memdict\s+yes\s+pip install lmtier-memdict", listed.stdout,
                     re.MULTILINE), listed.stdout + listed.stderr
    done = run_installed(pip_installed["good"], tmp_path, lmtier, "check-backend", "memdict", "--options",
                         str(options), "-q")  # the whole suite, 64 MiB item included
    assert done.returncode == 0, done.stdout + done.stderr
    # memdict is neither persistent nor shared, and has neither allocate (2 tests) nor an eviction listener
    assert_all_passed(done.stdout, suite_size(), skipped=2 + 2 + 1)


def test_the_installed_packages_own_tests_pass_against_the_installed_copy(
    pip_installed: dict[str, Path], tmp_path: Path
) -> None:
    shutil.copy(CONFORMANCE_TEST, tmp_path / "test_conformance.py")
    (tmp_path / "pytest.ini").write_text(INI)
    code = "import lmtier_memdict, sys; print(lmtier_memdict.__file__)"
    where = run_installed(pip_installed["good"], tmp_path, sys.executable, "-c", code).stdout.strip()
    assert where.startswith(str(pip_installed["good"])), where  # not the checkout under examples/
    done = run_installed(pip_installed["good"], tmp_path, sys.executable, "-m", "pytest", "-q",
                         "-p", "no:cacheprovider", "test_conformance.py")
    assert done.returncode == 0, done.stdout + done.stderr
    total, scenarios = suite_size()
    assert_all_passed(done.stdout, (total + 1, scenarios), skipped=2 + 2 + 1)  # + its own LRU test


# -- the plain dict backend an outside author writes from docs/writing-a-backend.md ----------------
DICTSTORE = REPO / "tests" / "support" / "lmtier-dictstore"
#: One-line bugs in the dict backend, and the conformance tests that must catch each.
DICTSTORE_BUGS = {
    "answers_in_reverse_order": (
        "return [self._data.get(key) for key in keys]",
        "return [self._data.get(key) for key in reversed(keys)]",
        {"test_results_follow_the_order_of_the_keys", "test_a_batch_of_many_small_items_round_trips",
         "test_keys_with_the_same_digest_in_other_namespaces_are_distinct"},
    ),
    "keeps_deleted_keys": (
        "self._data.pop(key, None)",
        "pass",
        {"test_delete_removes_and_absent_keys_are_fine"},
    ),
    "exposes_half_written_values": (
        'self._data[key] = bytes(memoryview(value).cast("B"))  # a copy: the caller may reuse value',
        'data = bytes(memoryview(value).cast("B")); self._data[key] = data[: len(data) // 2]; '
        'await __import__("asyncio").sleep(0); self._data[key] = data',
        {"test_concurrent_put_and_get_never_see_a_partial_value"},
    ),
}


@pytest.fixture(scope="module")
def dictstore_sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The dict backend pip-installed as written, and once per bug in DICTSTORE_BUGS."""
    root = tmp_path_factory.mktemp("dictstore")
    sites = {}
    for variant in ["as written", *DICTSTORE_BUGS]:
        source = root / f"src-{variant.replace(' ', '-')}"
        shutil.copytree(DICTSTORE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
        if variant in DICTSTORE_BUGS:
            old, new, _ = DICTSTORE_BUGS[variant]
            backend = source / "lmtier_dictstore" / "backend.py"
            assert backend.read_text().count(old) == 1, variant
            backend.write_text(backend.read_text().replace(old, new))
        sites[variant] = root / f"site-{variant.replace(' ', '-')}"
        pip_install(source, sites[variant])
    return sites


def test_a_plain_dict_backend_without_argument_checks_passes_lmtier_check_backend(
    dictstore_sites: dict[str, Path], tmp_path: Path
) -> None:
    backend = (DICTSTORE / "lmtier_dictstore" / "backend.py").read_text()
    assert len(backend.splitlines()) <= 40 and "isinstance" not in backend  # plain, and trusts its callers
    lmtier = str(Path(sys.executable).parent / "lmtier")
    done = run_installed(dictstore_sites["as written"], tmp_path, lmtier, "check-backend", "dictstore", "-q")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "never awaited" not in done.stdout + done.stderr  # the suite leaves no coroutine behind
    # neither persistent nor shared, no get_into (2 tests), stats, allocate (2), eviction listener or clear
    assert_all_passed(done.stdout, suite_size(), skipped=2 + 2 + 1 + 2 + 1 + 1)


@pytest.mark.parametrize("bug", sorted(DICTSTORE_BUGS))
def test_a_dict_backend_with_one_bug_fails_lmtier_check_backend_where_it_should(
    dictstore_sites: dict[str, Path], tmp_path: Path, bug: str
) -> None:
    must_fail = DICTSTORE_BUGS[bug][2]
    controls = {"test_empty_batches_return_empty_lists", "test_overwrite_replaces_the_value"}
    lmtier = str(Path(sys.executable).parent / "lmtier")
    done = run_installed(dictstore_sites[bug], tmp_path, lmtier, "check-backend", "dictstore", "-q",
                         "-k", " or ".join(sorted(must_fail | controls)))
    assert done.returncode == pytest.ExitCode.TESTS_FAILED, done.stdout + done.stderr
    failed = set(re.findall(r"^FAILED \S+::(test_\w+)", done.stdout, re.MULTILINE))
    assert failed == must_fail, done.stdout


def test_a_pip_installed_subtly_broken_package_fails_lmtier_check_backend(
    pip_installed: dict[str, Path], tmp_path: Path
) -> None:
    lmtier = str(Path(sys.executable).parent / "lmtier")
    done = run_installed(pip_installed["bad"], tmp_path, lmtier, "check-backend", "memdict", "-q",
                         "-k", "reference or empty_batches")
    assert done.returncode == pytest.ExitCode.TESTS_FAILED, done.stdout + done.stderr
    assert "FAILED" in done.stdout and "test_put_does_not_keep_a_reference_to_the_callers_buffer" in done.stdout
    assert re.search(r"\b1 failed, 1 passed", done.stdout), done.stdout
