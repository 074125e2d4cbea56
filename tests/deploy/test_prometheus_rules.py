"""deploy/prometheus: the config and rules pass `promtool check`, the alert unit tests
(deploy/prometheus/tests/alerts.test.yml) pass `promtool test rules`, every alert is tested
firing and staying quiet, and every alert links a runbook page that exists (and every page
has its alert)."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest
import yaml

# not resolve(): under Bazel the runfiles tree (which holds //:ops_files) is the root, not the checkout
ROOT = pathlib.Path(__file__).absolute().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
RUNBOOKS = ROOT / "docs" / "runbooks"


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    return found


def alerts() -> list[dict]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.rules.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def run(promtool: str, *args: str) -> str:
    done = subprocess.run([promtool, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_config_and_rules_pass_promtool_check(promtool):
    out = run(promtool, "check", "config", "prometheus.yml")  # checks the rule files it loads too
    assert "SUCCESS: 19 rules found" in out and "SUCCESS: 10 rules found" in out


def test_alert_unit_tests_pass(promtool):
    assert "SUCCESS" in run(promtool, "test", "rules", "tests/alerts.test.yml")


def test_a_broken_threshold_fails_the_alert_unit_tests(promtool, tmp_path):
    """The unit tests can fail: the TTFT SLO raised from 2 s to 3 s leaves the 2.425 s case quiet."""
    copy = tmp_path / "prometheus"
    shutil.copytree(PROMETHEUS, copy)
    rules = copy / "alerts.rules.yml"
    text = rules.read_text()
    assert text.count("p95_5m > 2\n") == 1
    rules.write_text(text.replace("p95_5m > 2\n", "p95_5m > 3\n"))
    done = subprocess.run([promtool, "test", "rules", "tests/alerts.test.yml"], cwd=copy, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1
    assert "alertname: TuneForgeServingTTFTHigh, time: 20m" in done.stdout + done.stderr


def test_every_alert_is_tested_firing_and_quiet():
    tests = yaml.safe_load((PROMETHEUS / "tests" / "alerts.test.yml").read_text())["tests"]
    cases = [case for test in tests for case in test.get("alert_rule_test", [])]
    names = [rule["alert"] for rule in alerts()]
    assert len(names) == 10
    for name in names:
        outcomes = [bool(case["exp_alerts"]) for case in cases if case["alertname"] == name]
        assert True in outcomes and False in outcomes, f"{name}: needs a firing and a quiet case"


def test_every_alert_links_its_runbook_and_every_runbook_has_an_alert():
    linked = {}
    for rule in alerts():
        url = rule["annotations"]["runbook_url"]
        assert url.startswith("docs/runbooks/"), rule["alert"]
        assert (ROOT / url).is_file(), f"{rule['alert']}: {url} is missing"
        assert rule["alert"] in (ROOT / url).read_text(), f"{url} does not name {rule['alert']}"
        linked[url] = rule["alert"]
    assert sorted(linked) == sorted(f"docs/runbooks/{p.name}" for p in RUNBOOKS.glob("*.md") if p.name != "README.md")
