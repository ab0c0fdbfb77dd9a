"""The `lmtier` command line, in-process through ``lmtier.cli.main`` and as a real console script."""

from __future__ import annotations

import importlib.machinery
import re
import socket
import subprocess
import sys
import types
import urllib.request
from pathlib import Path

import pytest
import yaml

from lmtier.cli import main, parse_size
from lmtier.cli._common import redact

LMTIER = Path(sys.executable).parent / "lmtier"  # the console script pip installed into the venv


def write_config(path: Path, tmp_path: Path, *extra_tiers: dict) -> Path:
    config = {"chunk_tokens": 256, "tiers": [
        {"name": "hot", "backend": "cpu", "options": {"max_bytes": "64MiB", "pinned": False}},
        {"name": "nvme", "backend": "disk", "options": {"root": str(tmp_path / "disk"), "max_bytes": "1GiB"}},
        *extra_tiers,
    ]}
    path.write_text(yaml.safe_dump(config))
    return path


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("lmtier: error:")]


# -- doctor -------------------------------------------------------------------------------------
def test_doctor_reports_the_environment_and_the_config_without_printing_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    shared = {"name": "shared", "backend": "redis", "write": "async",
              "options": {"url": "redis://lmtier:hunter2-secret@127.0.0.1:6399/0", "connect_at_open": False}}
    monkeypatch.setenv("LMTIER_CONFIG", str(write_config(tmp_path / "c.yaml", tmp_path, shared)))
    monkeypatch.setenv("LMTIER_TIERS__SHARED__OPTIONS__KEY_PREFIX", "test-")
    assert main(["doctor"]) == 0
    out, err = capsys.readouterr()
    for expected in ("torch", "cuda", "pinned memory", "transfer path", str(tmp_path / "c.yaml"),
                     "tier hot", "tier nvme", "tier shared", "redis, write: async",
                     "LMTIER_TIERS__SHARED__OPTIONS__KEY_PREFIX", "redis-server", "weed", "verdict: OK"):
        assert expected in out
    assert re.search(r"^\s+cpu\s+installed", out, re.MULTILINE)
    assert "hunter2" not in out + err


def test_doctor_names_the_bad_key_of_a_broken_config_and_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiers:\n  - {name: hot, backend: cpu, options: {max_byts: 1MiB}}\n")
    assert main(["doctor", "--config", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "verdict: NOT OK" in out and "tiers[0].options.max_byts: unknown key" in out


def test_doctor_names_the_copy_mode_and_a_bad_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LMTIER_TRANSFER_MODE", "staged")
    monkeypatch.setenv("LMTIER_STAGING_H2D_BYTES", str(48 << 20))
    main(["doctor"])
    assert "copy mode staged (staging 24 MiB device->host, 48 MiB host->device)" in capsys.readouterr().out
    monkeypatch.setenv("LMTIER_TRANSFER_MODE", "fastest")
    main(["doctor"])
    assert "LMTIER_TRANSFER_MODE='fastest'; use one of auto, mapped, staged" in capsys.readouterr().out


def test_secret_looking_options_and_url_passwords_are_masked() -> None:
    shown = redact({"url": "redis://u:pw@h:1/0", "secret_key": "abc", "nested": {"api_key": "k"},
                     "plain": "redis://h:1/0", "access_key_env": "AWS_KEY", "size": 3})
    assert shown == {"url": "redis://u:***@h:1/0", "secret_key": "***", "nested": {"api_key": "***"},
                     "plain": "redis://h:1/0", "access_key_env": "***", "size": 3}


# -- backends -----------------------------------------------------------------------------------
def test_backends_lists_every_registered_backend_with_origin_and_install_state(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["NAME", "ORIGIN", "INSTALLED", "INSTALL", "HINT", "DESCRIPTION"]
    assert re.search(r"^cpu\s+entrypoint:cpu\s+yes\s+pip install lmtier", out, re.MULTILINE)
    assert re.search(r"^disk\s+entrypoint:disk\s+yes\s+pip install lmtier", out, re.MULTILINE)


def test_the_console_script_and_python_m_run_as_real_processes(tmp_path: Path) -> None:
    assert LMTIER.is_file(), f"{LMTIER} missing: the project is not pip-installed into this venv"
    done = subprocess.run([str(LMTIER), "backends"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^cpu\s+entrypoint:cpu\s+yes", done.stdout, re.MULTILINE)
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiers:\n  - {name: hot, backend: cpu, write: sometimes}\n")
    done = subprocess.run([sys.executable, "-m", "lmtier", "config", "validate", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert error_lines(done.stderr) == [
        f"lmtier: error: {bad}: invalid lmtier configuration: tiers[0].write: "
        "Input should be 'through' or 'async' (got 'sometimes')"
    ]


# -- config validate ----------------------------------------------------------------------------
def test_config_validate_accepts_a_good_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path / "good.yaml", tmp_path)
    assert main(["config", "validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{path}: OK" in out and "hot (cpu, write: through) -> nvme (disk, write: through)" in out


def test_config_validate_shows_the_server_and_its_deadlines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "client.yaml"
    path.write_text("server: unix:///run/lmtier/lmtier.sock\nserver_timeout_s: {lookup: 0.2}\n")
    assert main(["config", "validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "server: unix:///run/lmtier/lmtier.sock (the tiers are the server's)" in out
    assert "server deadlines: lookup 0.2 s, fetch 5 s, reserve 0.5 s, commit 30 s, flush 60 s, connect 2 s" in out


@pytest.mark.parametrize(("tiers", "message"), [
    ([{"name": "hot", "backend": "cpu"}, {"name": "nvme", "backend": "disk", "options": {"rot": "/x"}}],
     r"tiers\[1\]\.options\.rot: unknown key; allowed keys: .*root"),  # phase two: the backend's model
    ([{"name": "hot", "backend": "cpu"}, {"name": "x", "backend": "nosuch"}],
     r"tiers\[1\]\.backend: unknown backend 'nosuch'; known backends: cpu, disk"),
    ([{"name": "hot", "backend": "cpu", "queue_depth": 0}],
     r"tiers\[0\]\.queue_depth: Input should be greater than or equal to 1"),  # phase one: core schema
])
def test_config_validate_rejects_a_bad_file_naming_the_key_path_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiers: list, message: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"tiers": tiers}))
    assert main(["config", "validate", str(path)]) == 2
    out, err = capsys.readouterr()
    (line,) = error_lines(err)
    assert re.search(message, line) and str(path) in line
    assert out == ""


def test_config_validate_applies_environment_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path / "good.yaml", tmp_path)
    monkeypatch.setenv("LMTIER_TIERS__NVME__OPTIONS__MAX_BYTES", "lots")
    assert main(["config", "validate", str(path)]) == 2
    assert "tiers[1].options.max_bytes" in capsys.readouterr().err


# -- check-backend ------------------------------------------------------------------------------
def test_check_backend_runs_the_conformance_suite_against_cpu(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    options = tmp_path / "cpu.yaml"
    options.write_text("max_bytes: 16MiB\npinned: false\n")
    args = ["check-backend", "cpu", "--options", str(options), "--big-item", "1MiB", "-q",
            "-k", "round_trip or order or buffer or big_item"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "BackendConformance against 'cpu' (entrypoint:cpu)" in out
    assert re.search(r"\b[1-9][0-9]* passed", out) and "failed" not in out, out


def test_check_backend_exit_code_is_pytests(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-backend", "cpu", "-k", "no_test_is_called_this"]) == pytest.ExitCode.NO_TESTS_COLLECTED


def test_check_backend_refuses_unknown_backends_and_bad_options_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check-backend", "nosuch"]) == 2
    assert "unknown backend 'nosuch'" in error_lines(capsys.readouterr().err)[0]
    options = tmp_path / "cpu.yaml"
    options.write_text("max_byts: 1MiB\n")
    assert main(["check-backend", "cpu", "--options", str(options)]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert f"{options}: " in line and "options.max_byts: unknown key" in line


# -- bench, demo --------------------------------------------------------------------------------
def test_bench_measures_every_configured_tier_against_the_raw_baselines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path / "c.yaml", tmp_path)
    assert main(["bench", "--config", str(path), "--size", "64KiB", "--count", "3"]) == 0
    out = capsys.readouterr().out
    assert "3 x 65.5 kB values per tier" in out and "raw memcpy (numpy copyto)" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("hot ", "nvme "))}
    assert rows["hot"][1] == "cpu" and rows["nvme"][1] == "disk"
    assert all(float(v) > 0 for row in rows.values() for v in row[2:8]), out
    assert list((tmp_path / "disk").rglob("*-*")) == [], "bench left its values in the disk tier"


def test_bench_shows_each_codec_tiers_ratio_and_throughput_with_the_codec_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path / "c.yaml", tmp_path,
                        {"name": "zipped", "backend": "disk", "codec": {"name": "zstd", "level": 3},
                         "options": {"root": str(tmp_path / "z")}},
                        {"name": "quant", "backend": "disk", "codec": "fp8", "options": {"root": str(tmp_path / "q")}})
    assert main(["bench", "--config", str(path), "--size", "1MiB", "--count", "2"]) == 0
    out = capsys.readouterr().out
    codecs = out[out.index("codecs: the same tiers"):]
    rows = {line.split()[0]: line.split() for line in codecs.splitlines() if line.startswith(("zipped ", "quant "))}
    assert rows["zipped"][1:3] == ["zstd", "level=3"] and rows["quant"][1] == "fp8"
    zstd_ratio, fp8_ratio = float(rows["zipped"][3]), float(rows["quant"][2])
    assert 1.05 < zstd_ratio < 1.6 and 1.9 < fp8_ratio < 2.0, codecs  # bf16 KV-shaped: exponents compress
    assert all(float(v) > 0 for v in rows["quant"][3:7]), codecs
    assert "stored raw" not in codecs  # a 1 MiB value is whole head vectors: fp8 encodes it
    for root in ("z", "q"):
        assert list((tmp_path / root).rglob("*-*")) == [], f"bench left its values in {root}"


def test_parse_size_accepts_decimal_and_binary_units() -> None:
    assert parse_size("37.7MB") == 37_700_000
    assert parse_size("36MiB") == 37_748_736
    assert parse_size("4096") == 4096


def test_the_storage_demo_stores_then_hits_from_disk_in_a_fresh_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["demo", "--storage", "--tokens", "1000", "--chunk-tokens", "64", "--scale", "64",
            "--dir", str(tmp_path / "demo")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "[pass 1] lookup: hit 0 of 1000 tokens" in out
    assert "[pass 1] stored 960 of 1000 tokens" in out  # 15 full chunks; the last 40 tokens are not one
    assert "[pass 2, fresh process] lookup: hit 960 of 1000 tokens" in out
    assert "retrieved 960 of 1000 tokens byte-exact" in out and "hot 0, local 15" in out
    assert "demo OK" in out
    assert len([p for p in (tmp_path / "demo").rglob("*-*") if p.is_file()]) == 15  # --dir keeps the files


def test_demo_delegates_to_lmtier_demo_when_it_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    fake = types.ModuleType("lmtier.demo")
    fake.__spec__ = importlib.machinery.ModuleSpec("lmtier.demo", None)
    fake.run_demo = lambda argv: seen.append(argv) or 7  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "lmtier.demo", fake)
    assert main(["demo", "--model", "tiny", "--help"]) == 7
    assert seen == [["--model", "tiny", "--help"]]


# -- serve-metrics ------------------------------------------------------------------------------
def test_serve_metrics_serves_the_default_registry_until_terminated() -> None:
    proc = subprocess.Popen([str(LMTIER), "serve-metrics", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # printed once the socket is listening; EOF if it died
        match = re.search(r"http://127\.0\.0\.1:(\d+)/metrics", line)
        assert match, f"no address line: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
        with urllib.request.urlopen(match.group(0), timeout=10) as resp:
            body = resp.read().decode()
        assert "lmtier_lookup_chunks_total" in body and "# TYPE lmtier_tier_hits_total counter" in body
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()
    assert proc.returncode == 0  # SIGTERM is a clean shutdown


@pytest.mark.timeout(60)
def test_serve_metrics_on_a_busy_port_is_one_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve-metrics", "--port", str(port)]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert f"cannot serve metrics on 127.0.0.1:{port}" in line and "pick another --port" in line


# -- help, and the autoload switch --------------------------------------------------------------
def test_help_lists_every_command_and_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("doctor", "backends", "config", "check-backend", "bench", "demo", "serve-metrics"):
        assert re.search(rf"^\s+{command}\s", out, re.MULTILINE), command
    assert main([]) == 2
    assert "usage: lmtier" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["doctor"], ["backends"], ["config", "validate"], ["check-backend"], ["bench"], ["serve-metrics"],
    ["demo", "--storage"],
])
def test_every_command_has_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*argv, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: lmtier {argv[0]}"), out


def test_with_autoload_disabled_the_commands_say_why_no_backend_is_known(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LMTIER_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert not re.search(r"^(cpu|disk)\s", out, re.MULTILINE)
    assert "entry-point discovery is off (LMTIER_DISABLE_PLUGIN_AUTOLOAD is set)" in out
    path = write_config(tmp_path / "c.yaml", tmp_path)
    assert main(["config", "validate", str(path)]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "tiers[0].backend: unknown backend 'cpu'; known backends: none" in line
    assert "LMTIER_DISABLE_PLUGIN_AUTOLOAD is set" in line
    assert main(["doctor", "--config", str(path)]) == 1
    assert "discovery              off (LMTIER_DISABLE_PLUGIN_AUTOLOAD is set)" in capsys.readouterr().out
    monkeypatch.setenv("LMTIER_DISABLE_PLUGIN_AUTOLOAD", "0")  # a false value keeps autoload on
    assert main(["config", "validate", str(path)]) == 0


# -- doctor: disk space, fault drill ------------------------------------------------------------
def test_doctor_says_when_a_disk_tier_is_larger_than_its_filesystem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"tiers": [
        {"name": "hot", "backend": "cpu", "options": {"max_bytes": "64MiB", "pinned": False}},
        {"name": "nvme", "backend": "disk", "options": {"root": str(tmp_path / "disk"), "max_bytes": "1PiB"}},
    ]}))
    assert main(["doctor", "--config", str(path)]) == 0  # it still works: a full disk evicts
    out = capsys.readouterr().out
    assert re.search(r"tier nvme disk\s+max_bytes 1\.0 PiB is more than its filesystem can hold", out)
    assert "lower max_bytes to at most" in out and "verdict: OK" in out


def test_doctor_faults_drills_each_tier_and_says_what_it_did(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.support.redis_server import redis_available, start_redis

    if not redis_available():
        pytest.skip("redis-server is not installed")
    server = start_redis(tmp_path / "redis")
    try:
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({"tiers": [
            {"name": "hot", "backend": "cpu", "timeout_s": 0.5, "options": {"max_bytes": "64MiB", "pinned": False}},
            {"name": "nvme", "backend": "disk", "timeout_s": 0.5,
             "options": {"root": str(tmp_path / "disk"), "max_bytes": "1GiB"}},
            {"name": "shared", "backend": "redis", "write": "async", "timeout_s": 0.5, "options": {"url": server.url}},
        ]}))
        assert main(["doctor", "--faults", str(path)]) == 0
    finally:
        server.stop()
    out = capsys.readouterr().out
    tiers = {block.split("\n", 1)[0]: block for block in out.split("\ntier ")[1:]}
    assert set(tiers) == {"hot (cpu)", "nvme (disk)", "shared (redis)"}
    for block in tiers.values():
        assert re.search(r"round trip\s+ok: 4 values", block)
        assert re.search(r"timeout\s+ok: a tier stalled for 3\.5 s cost the caller a miss", block)
    assert re.search(r"corrupted value\s+ok: a flipped payload bit was a miss", tiers["nvme (disk)"])
    assert re.search(r"killed connection\s+ok: [1-9]\d* connection\(s\) to 127\.0\.0\.1:\d+ cut: the next calls "
                     r"served \d then 4 of 4 values", tiers["shared (redis)"])
    assert re.search(r"killed connection\s+skipped: the tier talks to no TCP server", tiers["nvme (disk)"])
    assert "verdict: OK" in out
    assert list((tmp_path / "disk").rglob("*-*")) == [], "the drill left its scratch values behind"
