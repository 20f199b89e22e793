"""``consentgate purpose | patient | consent | audit`` with CliRunner, on SQLite and PostgreSQL."""

from __future__ import annotations

import getpass
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import text

from cli.database import make_engine
from cli.main import cli
from tests.test_consent_support import INS_F_1985, NOTICE_V1

Run = Callable[..., Result]
PATIENT = ["--issuer", "CHR-METZ", "--patient-id", "IPP001"]


@pytest.fixture
def run(db_url: str, tmp_path: Path) -> Run:
    """Run ``consentgate --config <test config> ARGS...`` on an initialised database."""
    config = tmp_path / "consentgate.toml"
    config.write_text(
        f'[node]\ndata_dir = "{(tmp_path / "data").as_posix()}"\ndatabase_url = "{db_url}"\n',
        encoding="utf-8",
    )
    runner = CliRunner()

    def invoke(*args: str) -> Result:
        return runner.invoke(cli, ["--config", str(config), *args], catch_exceptions=False)

    assert invoke("init").exit_code == 0
    return invoke


def ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    return result.stdout


def one_line_error(result: Result, fragment: str, code: int = 1) -> None:
    assert result.exit_code == code, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ") and fragment in lines[0], lines[0]


def _purpose_and_patient(run: Run, tmp_path: Path) -> None:
    notice = tmp_path / "notice.txt"
    notice.write_text(NOTICE_V1, encoding="utf-8")
    ok(
        run(
            "purpose",
            "add",
            "regional",
            "--name",
            "Partage régional",
            "--notice",
            str(notice),
            "--by",
            "dpo",
        )
    )
    ok(
        run(
            "patient",
            "add",
            *PATIENT,
            "--birth-name",
            "Dupont",
            "--first-name",
            "Alice",
            "--birth-date",
            "1985-05-12",
            "--sex",
            "F",
            "--ins",
            INS_F_1985,
            "--by",
            "admission",
        )
    )


def test_purpose_commands(run: Run, tmp_path: Path) -> None:
    notice = tmp_path / "notice.txt"
    notice.write_text(NOTICE_V1, encoding="utf-8")
    out = ok(
        run("purpose", "add", "regional", "--name", "Partage régional", "--notice", str(notice))
    )
    assert out.startswith("purpose regional added (opt-in, notice v1 sha256 ")
    ok(run("purpose", "add", "research", "--name", "Recherche", "--model", "opt-out"))
    assert "notice v2" in ok(run("purpose", "notice", "regional", "--file", str(notice)))
    listing = ok(run("purpose", "list"))
    assert "regional" in listing and "v2" in listing and "opt-out" in listing
    assert listing.strip().endswith("2 purpose(s)")
    one_line_error(run("purpose", "add", "regional", "--name", "x"), "already exists")
    one_line_error(
        run("purpose", "notice", "nope", "--file", str(notice)), "unknown purpose 'nope'"
    )
    one_line_error(
        run("purpose", "add", "x", "--name", "x", "--notice", str(tmp_path / "none")), "cannot read"
    )


def test_patient_commands(run: Run, tmp_path: Path) -> None:
    _purpose_and_patient(run, tmp_path)
    shown = ok(run("patient", "show", *PATIENT))
    assert "birth_name: Dupont" in shown and "birth_date: 1985-05-12" in shown
    assert f"identifier: INS-NIR 1.2.250.1.213.1.4.8 {INS_F_1985}" in shown
    assert "consent: regional undecided" in shown
    assert "CHR-METZ/IPP001" in ok(run("patient", "find", "dupont alice"))
    assert ok(run("patient", "find", "nobody")).strip() == "0 patient(s)"
    base = [
        "patient",
        "add",
        "--issuer",
        "CHR-METZ",
        "--patient-id",
        "IPP002",
        "--birth-name",
        "Martin",
        "--first-name",
        "Paul",
        "--sex",
        "M",
    ]
    one_line_error(run(*base, "--birth-date", "1960-02-30"), "birth date must be a valid date")
    one_line_error(run(*base, "--birth-date", "1960-02-03", "--ins", "123"), "15 characters")
    one_line_error(
        run(
            "patient",
            "add",
            *PATIENT,
            "--birth-name",
            "D",
            "--first-name",
            "A",
            "--birth-date",
            "1985-05-12",
            "--sex",
            "F",
        ),
        "patient CHR-METZ/IPP001 already exists",
    )
    one_line_error(
        run("patient", "show", "--issuer", "CHR-METZ", "--patient-id", "NOPE"),
        "unknown patient CHR-METZ/NOPE",
    )


def test_patient_import(run: Run, tmp_path: Path) -> None:
    good = tmp_path / "patients.csv"
    good.write_text(
        "issuer,patient_id,birth_name,first_name,birth_date,sex\n"
        "CHR-METZ,P1,Dupont,Alice,1985-05-12,F\nCHU-REIMS,P2,Martin,Paul,1960-02-03,M\n",
        encoding="utf-8",
    )
    bad = tmp_path / "bad.csv"
    bad.write_text(
        good.read_text(encoding="utf-8") + "CHR-METZ,P3,Durand,Léa,1990-01-01,Q\n", encoding="utf-8"
    )
    one_line_error(run("patient", "import", str(bad)), "bad.csv: nothing imported: line 4: sex")
    assert ok(run("patient", "find", "P1")).strip() == "0 patient(s)"
    assert (
        ok(run("patient", "import", str(good))).strip() == "imported 2 patient(s) from patients.csv"
    )
    one_line_error(
        run("patient", "import", str(good)), "line 2: patient CHR-METZ/P1 already exists"
    )
    assert "birth_date (YYYY-MM-DD)" in ok(run("patient", "import", "--help"))


def test_consent_commands(run: Run, tmp_path: Path) -> None:
    _purpose_and_patient(run, tmp_path)
    consent = ["consent"]
    args = [*PATIENT, "--purpose", "regional"]
    one_line_error(run(*consent, "withdraw", *args), "nothing to withdraw")
    out = ok(run(*consent, "grant", *args, "--channel", "desk", "--by", "desk1"))
    assert out.startswith("grant recorded for CHR-METZ/IPP001, purpose regional (event ")
    assert out.strip().endswith("now permit")
    assert "regional                 permit" in ok(run(*consent, "show", *PATIENT))
    assert ok(run(*consent, "withdraw", *args)).strip().endswith("now deny")
    ok(run(*consent, "refuse", *args, "--representative", "Jean Dupont", "--by", "desk2"))
    history = ok(run(*consent, "history", *PATIENT, "--purpose", "regional"))
    lines = history.strip().splitlines()
    assert len(lines) == 5 and lines[-1] == "3 event(s)"
    assert "grant" in lines[1] and "inactive" in lines[1] and "desk1" in lines[1]
    assert "withdraw" in lines[2] and getpass.getuser() in lines[2]
    assert "refuse" in lines[3] and "active" in lines[3] and "desk2 (for: Jean Dupont)" in lines[3]
    one_line_error(run(*consent, "grant", *PATIENT, "--purpose", "nope"), "unknown purpose 'nope'")
    one_line_error(
        run(*consent, "grant", "--issuer", "X", "--patient-id", "Y", "--purpose", "regional"),
        "unknown patient X/Y",
    )
    one_line_error(run(*consent, "show", "--issuer", "X", "--patient-id", "Y"), "unknown patient")
    bad_channel = run(*consent, "grant", *args, "--channel", "fax")
    assert bad_channel.exit_code == 2 and "Traceback" not in bad_channel.output

    stdout_bundle = json.loads(ok(run(*consent, "export-fhir", *PATIENT)))
    target = tmp_path / "consents.json"
    assert "3 Consent resource(s)" in ok(
        run(*consent, "export-fhir", *PATIENT, "--output", str(target))
    )
    bundle = json.loads(target.read_text(encoding="utf-8"))
    assert bundle == stdout_bundle
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "collection"
    statuses = [e["resource"]["status"] for e in bundle["entry"]]
    assert statuses == ["inactive", "inactive", "active"]
    grant_id = bundle["entry"][0]["resource"]["identifier"][0]["value"]
    out = ok(run(*consent, "entered-in-error", grant_id, "--reason", "wrong patient"))
    assert out.startswith(f"event {grant_id} marked entered-in-error")
    one_line_error(run(*consent, "entered-in-error", grant_id, "--reason", "again"), "already")


def test_audit_verify(run: Run, tmp_path: Path, db_url: str) -> None:
    _purpose_and_patient(run, tmp_path)
    ok(run("consent", "grant", *PATIENT, "--purpose", "regional"))
    out = ok(run("audit", "verify")).splitlines()
    assert out[0] == "audit log intact (3 entries); consent records agree with it"
    head = out[1].removeprefix("head ")
    assert ok(run("audit", "verify", "--head", head)).startswith("audit log intact")
    one_line_error(run("audit", "verify", "--head", "nonsense"), "--head must be SEQ:HASH")
    engine = make_engine(db_url, pool_size=1)
    try:
        with engine.begin() as connection:
            connection.execute(text("UPDATE consent_audit SET target = 'patient:99' WHERE seq = 2"))
    finally:
        engine.dispose()
    one_line_error(run("audit", "verify"), "audit log damaged at entry 2: entry 2 has been altered")
