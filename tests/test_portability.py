"""What differs between Linux and macOS (the mac_fw100m users' machines), with the platform faked."""

import os
import resource

import prepare_fineweb
from conftest import assert_user_error, call
from production.core import runtime
from production.core.runtime import maxrss_bytes, peak_rss_bytes
from production.data.tokenize import default_workers


def test_ru_maxrss_is_kib_on_linux_and_bytes_on_macos():
    assert maxrss_bytes(1000, "linux") == 1_024_000
    assert maxrss_bytes(1_024_000, "darwin") == 1_024_000
    raw = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert peak_rss_bytes() >= maxrss_bytes(raw)  # this process, in bytes (and it only grows)


def test_peak_rss_follows_the_platform(monkeypatch):
    monkeypatch.setattr(runtime.sys, "platform", "darwin")
    assert runtime.maxrss_bytes(4096) == 4096
    monkeypatch.setattr(runtime.sys, "platform", "linux")
    assert runtime.maxrss_bytes(4096) == 4096 * 1024


def test_worker_default_without_sched_getaffinity(monkeypatch):
    """macOS has no os.sched_getaffinity: prepare_fineweb.py must still build its parser (and answer --help)."""
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert default_workers() == 8
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert default_workers() == 1
    assert prepare_fineweb.build_parser().get_default("workers") == 1


def test_prepare_without_its_optional_packages_says_what_to_install(monkeypatch):
    monkeypatch.setattr(prepare_fineweb, "MISSING", "datasets")
    proc = call(prepare_fineweb.main, "--tokens", "1M", "--output", "x.npy")
    assert_user_error(proc, "`datasets`", "pip install -r requirements-prepare.txt")
