"""docs/service.md is the full reference: its settings tables list every variable the server reads (the
Settings fields, OTHER_VARIABLES, and any CASCADE_* name a service module reads from the environment), and
its "Rejection reasons" table every reason cascade_rejected_requests_total counts, nothing more."""

from __future__ import annotations

import re

from service import errors
from service.settings import OTHER_VARIABLES, env_names
from tests.deploy.tooling import REPO

DOC = REPO / "docs" / "service.md"
SERVICE = REPO / "service"


def section(title: str) -> str:
    """The text of one `##`/`###` section of docs/service.md, up to the next heading of any level."""
    text = DOC.read_text()
    match = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#|\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"docs/service.md has no section {title!r}"
    return match.group(1)


def first_column(text: str) -> list[str]:
    """The backticked names in the first column of every table body row (header rows skipped)."""
    lines = text.splitlines()
    names = []
    for line, following in zip(lines, [*lines[1:], ""]):
        match = re.match(r"\| `([^`]+)` \|", line)
        if match and not following.startswith("|---"):
            names.append(match.group(1))
    return names


def variables_read_by_modules() -> set[str]:
    """CASCADE_* names the service modules read straight from the environment (auth, access log)."""
    names: set[str] = set()
    for path in SERVICE.glob("*.py"):
        names |= set(re.findall(r"\.get\(\s*\"(CASCADE_[A-Z_]+)\"", path.read_text()))
    return names


def rejection_reasons() -> set[str]:
    """Every label value of cascade_rejected_requests_total: the `reason` of each ServiceError, and
    the literal reasons middleware counts itself (413 before parsing, 401)."""
    reasons: set[str] = set()
    pending = [errors.ServiceError]
    while pending:
        cls = pending.pop()
        pending += cls.__subclasses__()
        if cls.reason is not None:
            reasons.add(cls.reason)
    for path in SERVICE.glob("*.py"):
        reasons |= set(re.findall(r"rejected\.labels\(\s*\"(\w+)\"\s*\)", path.read_text()))
    return reasons


def test_the_settings_section_lists_every_variable_the_server_reads() -> None:
    documented = first_column(section("Settings"))
    assert len(documented) == len(set(documented)), "a variable is listed twice"
    read_by_modules = variables_read_by_modules()
    assert {"CASCADE_API_KEYS_FILE", "CASCADE_LOG_PROMPTS"} <= read_by_modules, (
        "the scan of service/*.py for environment reads found too little"
    )
    server_reads = set(env_names()) | read_by_modules
    missing = sorted(server_reads - set(documented))
    assert not missing, f"docs/service.md, Settings, does not list {missing}"
    stale = sorted(set(documented) - server_reads)
    assert not stale, (
        f"docs/service.md, Settings, lists variables the server does not read: {stale}"
    )
    # Variables only the deployment files use are named (not tabled) in the same section.
    for name in OTHER_VARIABLES - server_reads:
        assert f"`{name}`" in section("Settings"), f"docs/service.md does not explain {name}"


def test_the_rejection_reasons_table_lists_every_reason() -> None:
    reasons = rejection_reasons()
    assert {"unauthorized", "too_large", "queue_full"} <= reasons, (
        "the reason scan found too little"
    )
    documented = first_column(section("Rejection reasons"))
    assert sorted(documented) == sorted(reasons), (
        f"documented {sorted(documented)}, the service counts {sorted(reasons)}"
    )
    metrics = section("Metrics")
    (row,) = [line for line in metrics.splitlines() if "`cascade_rejected_requests_total`" in line]
    assert all(re.search(rf"\b{reason}\b", row) for reason in reasons), row


def test_the_errors_table_lists_every_error_code() -> None:
    codes: set[str] = set()
    pending = [errors.ServiceError]
    while pending:
        cls = pending.pop()
        pending += cls.__subclasses__()
        codes.add(cls.code)
    text = section("Errors") + section("Rejection reasons")
    missing = sorted(code for code in codes if f"`{code}`" not in text)
    assert not missing, f"docs/service.md, Errors, does not list {missing}"
