"""The dashboard and alert rules in contrib/: checked with the real promtool and against the exports.

promtool comes from Debian's ``prometheus`` package (.ci/run installs it when missing).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpu_router.metrics import EXPORTED

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "contrib" / "prometheus" / "alerts.yml"
RULES_TEST = ROOT / "contrib" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "contrib" / "grafana" / "gpu-router.json"
README = ROOT / "README.md"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="needs promtool (Debian's prometheus; .ci/run installs it)"
)

REQUIRED_ALERTS = {"PriorityModelNotOnGPU", "NodeDown", "GPUUnhealthy", "GPURouterStale", "ActionsFailing"}
METRIC = re.compile(r"\bgpu_router_[a-z0-9_]+")


def rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(RULES.read_text())
    return [r for g in data["groups"] for r in g["rules"]]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_exprs() -> list[str]:
    out = []
    for p in dashboard()["panels"]:
        for t in p.get("targets", []):
            out.append(t["expr"])
    for v in dashboard()["templating"]["list"]:
        if v["type"] == "query":
            out.append(v["definition"])
    return out


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


@needs_promtool
def test_promtool_accepts_the_rules() -> None:
    r = promtool("check", "rules", str(RULES))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(rules())} rules found" in r.stdout


@needs_promtool
def test_each_alert_fires_and_stays_silent_in_the_rule_tests() -> None:
    r = promtool("test", "rules", RULES_TEST.name, cwd=RULES_TEST.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout
    # every alert has a case where it fires and one where it does not
    tests = yaml.safe_load(RULES_TEST.read_text())["tests"]
    fired, silent = set(), set()
    for t in tests:
        for case in t["alert_rule_test"]:
            (fired if case["exp_alerts"] else silent).add(case["alertname"])
    names = {r["alert"] for r in rules()}
    assert fired == names
    assert silent == names


@needs_promtool
def test_a_wrong_expectation_makes_the_rule_tests_fail(tmp_path: Path) -> None:
    # the rule tests can fail: the same file expecting NodeDown one minute too early does
    shutil.copy(RULES, tmp_path / RULES.name)
    text = RULES_TEST.read_text().replace(
        "      - eval_time: 3m\n        alertname: NodeDown",
        "      - eval_time: 2m\n        alertname: NodeDown",
        1,
    )
    (tmp_path / RULES_TEST.name).write_text(text)
    r = promtool("test", "rules", RULES_TEST.name, cwd=tmp_path)
    assert r.returncode != 0
    assert "NodeDown" in r.stdout + r.stderr


def test_the_required_alerts_are_there_and_name_what_they_are_about() -> None:
    by_name = {r["alert"]: r for r in rules()}
    assert set(by_name) >= REQUIRED_ALERTS
    assert by_name["PriorityModelNotOnGPU"]["for"] == "5m"
    for name, rule in by_name.items():
        summary = rule["annotations"]["summary"]
        assert re.search(r"\$labels\.(node|model|instance)", summary), (name, summary)
        assert rule["labels"]["severity"] in ("info", "warning", "critical")
        assert rule["annotations"]["description"]


def test_rules_and_dashboard_use_only_metrics_the_daemon_exports() -> None:
    used = set()
    for r in rules():
        used.update(METRIC.findall(r["expr"]))
    for expr in dashboard_exprs():
        used.update(METRIC.findall(expr))
    assert used, "no gpu_router_ metric found: the parsing is broken"
    assert used <= set(EXPORTED), sorted(used - set(EXPORTED))
    # the panels cover the parts the issue lists
    dash_used = {m for e in dashboard_exprs() for m in METRIC.findall(e)}
    for needed in (
        "gpu_router_node_state",
        "gpu_router_model_vram_bytes",
        "gpu_router_gpu_memory_usable_bytes",
        "gpu_router_priority_model_on_gpu",
        "gpu_router_actions_total",
        "gpu_router_poll_errors_total",
    ):
        assert needed in dash_used, needed


@needs_promtool
def test_every_dashboard_expression_is_valid_promql(tmp_path: Path) -> None:
    # promtool checks PromQL in rule files: wrap each expression as a recording rule, with
    # Grafana's variables replaced by what Grafana would send.
    subst = {"$__rate_interval": "5m", "$__range": "6h", "$node": "gpu-a", "${datasource}": "x"}
    recorded = []
    for i, expr in enumerate(e for e in dashboard_exprs() if not e.startswith("label_values(")):
        for k, v in subst.items():
            expr = expr.replace(k, v)
        assert "$" not in expr, expr
        recorded.append({"record": f"dashboard:expr_{i}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": recorded}]}))
    r = promtool("check", "rules", str(path))
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_dashboard_is_well_formed() -> None:
    d = dashboard()
    panels = d["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    assert {v["name"] for v in d["templating"]["list"]} == {"datasource", "node"}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0, p["title"]
        assert g["x"] + g["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
    # no two panels overlap on the grid (repeated panels are laid out by Grafana)
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, (p["title"], cells.get((x, y)))
                cells[(x, y)] = p["title"]


def test_the_readme_lists_every_exported_metric() -> None:
    text = README.read_text()
    section = text[text.index("## Monitoring") :]
    listed = set(METRIC.findall(section))
    families = {m for m in EXPORTED if not m.endswith(("_bucket", "_sum", "_count"))}
    assert families <= listed, sorted(families - listed)
    assert listed <= set(EXPORTED), sorted(listed - set(EXPORTED))
