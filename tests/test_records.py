"""Records (section 1a): the data classes behind manifest, config, status and
internal results behave as dataclasses do, and reading state stays cheap to
start: the read-only commands import nothing heavy."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from typing import ClassVar

import pytest
from conftest import SCRIPT

import lore_service as ls

# every record the module declares, found rather than listed, so a new one cannot be missed
RECORDS = [c for c in vars(ls).values() if isinstance(c, type) and "__record_fields__" in vars(c)]
assert len(RECORDS) >= 13


def as_stdlib_dataclass(cls: type) -> type:
    """The class as type checkers see it: its own source, decorated by the
    real dataclasses.dataclass (with the real field) instead of `record`."""
    import inspect
    import textwrap

    source = textwrap.dedent(inspect.getsource(cls))
    namespace = {**vars(ls), "record": dataclasses.dataclass, "field": dataclasses.field}
    exec(compile(source, f"<dataclass {cls.__name__}>", "exec"), namespace)
    return namespace[cls.__name__]


@pytest.mark.parametrize("cls", RECORDS, ids=lambda c: c.__name__)
def test_each_record_behaves_as_the_dataclass_type_checkers_see(cls):
    """Same fields in the same order, the same required ones, and the same
    defaults (factories called afresh) as stdlib dataclasses would give."""
    twin = as_stdlib_dataclass(cls)
    fields = dataclasses.fields(twin)
    assert cls.__record_fields__ == tuple(f.name for f in fields)
    missing = dataclasses.MISSING
    required = [f.name for f in fields if f.default is missing and f.default_factory is missing]
    values = {name: object() for name in required}
    ours, theirs = cls(**values), twin(**values)
    assert vars(ours) == {f.name: getattr(theirs, f.name) for f in fields}
    with pytest.raises(TypeError):
        cls(**dict(list(values.items())[:-1])) if required else cls(nonexistent=1)


def test_positional_keyword_and_default_fields_fill_in_declaration_order():
    pf = ls.PlannedFile("/a", "text", redacted="***")
    assert (pf.path, pf.content, pf.mode, pf.redacted) == ("/a", "text", 0o644, "***")
    assert repr(ls.Check("token", "ok", "found")) == "Check(name='token', status='ok', message='found', hint='')"


def test_factory_defaults_are_fresh_per_instance_and_not_left_on_the_class():
    one, two = ls.Plan(), ls.Plan()
    one.warnings.append("x")
    assert two.warnings == [] and one.warnings == ["x"]
    assert "warnings" not in vars(ls.Plan)
    assert ls.ServiceConfig().permanent_exit_codes == list(ls.DEFAULT_PERMANENT_CODES)
    assert ls.ServiceConfig().permanent_exit_codes is not ls.ServiceConfig().permanent_exit_codes


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: ls.Check("a"), "missing field 'status'"),
        (lambda: ls.Check("a", "ok", "m", "h", "extra"), "takes 4 fields, 5 given"),
        (lambda: ls.Check("a", "ok", "m", nme="x"), "nme"),
        (lambda: ls.Check("a", "ok", "m", name="again"), "name"),
    ],
)
def test_wrong_arguments_are_a_type_error_naming_the_field(make, words):
    with pytest.raises(TypeError, match=words):
        make()


def test_records_compare_by_value_and_are_unhashable():
    assert ls.Pause("manual", "r", "t", "h") == ls.Pause("manual", "r", "t", "h")
    assert ls.Pause("manual", "r", "t", "h") != ls.Pause("manual", "other", "t", "h")
    assert ls.Pause("manual", "r", "t", "h") != ("manual", "r", "t", "h")
    with pytest.raises(TypeError):
        hash(ls.Pause("manual", "r", "t", "h"))


def test_class_variables_are_not_fields():
    @ls.record
    class Counted:
        kind: ClassVar[str] = "demo"
        n: int

    assert Counted.__record_fields__ == ("n",) and Counted(3).n == 3 and Counted.kind == "demo"


def test_a_required_field_after_a_defaulted_one_is_refused_at_definition():
    class Bad:
        __annotations__ = {"a": "int", "b": "int"}
        a = 1

    with pytest.raises(TypeError, match="'b' without a default"):
        ls.record(Bad)


HEAVY = {
    # what the records and the CLI deliberately avoid (README "Performance")
    "dataclasses", "inspect", "typing", "ast", "tokenize",
    # what only commands that need it import
    "subprocess", "threading", "tomllib", "tomli_w", "keyring", "shutil", "random", "hashlib", "platform",
    # what time.strptime would pull in (staleness reads the install time)
    "_strptime", "calendar", "ctypes",
}  # fmt: skip


@pytest.mark.parametrize(
    "argv",
    [["status", "--json"], ["status"], ["list", "--json"], ["logs", "--tail", "5"], ["history"], ["history", "--json"]],
)
def test_read_only_commands_import_nothing_heavy(cli, installed, environ, project, argv):
    cli("trigger")  # a status with a run record and a log to read
    probe = (
        "import json, sys\n"
        "before = set(sys.modules)\n"
        "import lore_service\n"
        "code = lore_service.main(sys.argv[1:])\n"
        "print(json.dumps({'code': code, 'new': sorted(set(sys.modules) - before)}), file=sys.stderr)\n"
    )
    # -S: site (and .pth hooks of this test venv) may import anything; the
    # command's own imports are what is measured
    proc = subprocess.run(
        [sys.executable, "-S", "-c", probe, *argv],
        cwd=project,
        env={**environ, "PYTHONPATH": str(ls.os.path.dirname(SCRIPT))},
        capture_output=True,
        text=True,
        timeout=60,
    )
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    assert report["code"] == 0, proc.stderr
    loaded = set(report["new"]) | {m.split(".")[0] for m in report["new"]}
    if sys.platform == "linux":
        assert "platformdirs" not in loaded
    assert loaded & HEAVY == set()
