"""The settings' documentation: every field has a doc, ``docs/configuration.md`` is what
:func:`morec_rec.config.reference` generates now, and every flag of the command line says
what it does."""

from __future__ import annotations

import dataclasses
import re
import typing

import pytest
from conftest import ROOT

from morec_rec import config
from morec_rec.errors import MorecError
from morec_rec.jobs.cli import _parser, main

REFERENCE = ROOT / "docs" / "configuration.md"
REGENERATE = ("python -c 'from morec_rec.config import reference; "
              "print(reference(), end=\"\")' > docs/configuration.md")
COMMANDS = ("prepare", "synth", "train", "evaluate", "run", "demo")


@pytest.mark.parametrize("cls", list(config.SECTIONS), ids=lambda c: c.__name__)
def test_every_field_has_a_doc_free_of_outside_references(cls: type) -> None:
    docs = config.field_docs(cls)
    assert set(docs) == {f.name for f in dataclasses.fields(cls)}
    for name, doc in {**docs, "(class)": cls.__doc__ or ""}.items():
        assert len(doc.split()) >= 3, f"{cls.__name__}.{name}: {doc!r}"
        assert not re.search(r"README|SPEC|:mod:|:class:", doc), f"{cls.__name__}.{name}: {doc}"


def test_a_field_without_a_doc_is_an_error() -> None:
    @dataclasses.dataclass
    class Undocumented:
        #: Documented.
        a: int = 0
        b: int = 1

    with pytest.raises(TypeError, match="b have no #: doc"):
        config.field_docs(Undocumented)


def test_the_docs_of_fields_sharing_no_comment_stay_apart() -> None:
    docs = config.field_docs(config.MoRecConfig)
    assert docs["kp"].startswith("Proportional gain")
    assert docs["ki"].startswith("Integral gain")
    assert "Epochs of continued training" in docs["epochs"]


def test_the_configuration_reference_is_current() -> None:
    assert REFERENCE.read_text() == config.reference(), (
        f"{REFERENCE} is stale: regenerate it with {REGENERATE}")


def test_the_reference_has_a_row_per_field() -> None:
    text = config.reference()
    for cls, (section, _) in config.SECTIONS.items():
        assert f"## `[{section}]`: {cls.__name__}" in text
        for field in dataclasses.fields(cls):
            options = typing.get_args(typing.get_type_hints(cls)[field.name])
            kind = field.type
            if options and all(isinstance(o, str) for o in options):  # a Literal: its words
                kind = " \\| ".join(f'"{o}"' for o in options)
            assert f"| `{field.name}` | `{kind}` |" in text


def test_option_fields_list_their_words_and_refuse_others() -> None:
    assert typing.get_args(config.Control) == ("training", "validation")
    with pytest.raises(MorecError, match="config: draw = 'some' is out of range "
                                         "\\(expected multinomial or exact\\)"):
        config.SamplerConfig(draw="some")


def _help(command: str, capsys: pytest.CaptureFixture[str],
          monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as exit:
        main([command, "--help"])
    assert exit.value.code == 0
    return capsys.readouterr().out


def _entries(text: str) -> dict[str, str]:
    """Each option line of argparse's help -> its help text (continuation lines joined)."""
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        match = re.match(r"^  (-[^\s,]+(?:, -\S+)?)(?: \S+)?(?:\s{2,}(.*))?$", line)
        if match:
            current = match.group(1).split(", ")[-1]
            entries[current] = match.group(2) or ""
        elif current is not None and line.startswith(" " * 20) and line.strip():
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_says_what_it_does(command: str, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    entries = _entries(_help(command, capsys, monkeypatch))
    subparsers = next(a for a in _parser()._actions if a.choices)
    flags = {a.option_strings[-1] for a in subparsers.choices[command]._actions}
    assert set(entries) == flags  # the parse of the help text found every flag
    for flag, text in entries.items():
        words = re.sub(r"\(default: [^)]*\)", "", text)
        assert re.search(r"[A-Za-z]{2,}", words), f"{command} {flag}: no help ({text!r})"


def test_the_run_help_shows_a_fields_doc_and_default(capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    entries = _entries(_help("run", capsys, monkeypatch))
    assert len(entries) > 40  # the job's flags and every field of three configs
    assert entries["--ki"].startswith("Integral gain of every controller")
    assert entries["--ki"].endswith("(default: 60.0)")
    assert "(default: accuracy.relative=1.01)" in entries["--hold"]
    assert "--seed" in entries and "--sub-batch-size" in entries


def test_the_prepare_help_lists_the_source_fields(capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    entries = _entries(_help("prepare", capsys, monkeypatch))
    assert entries["--k-core"].startswith("Iterative k-core")
    assert entries["--k-core"].endswith("(default: 5)")
    assert "--delimiter" in entries and "[prepare] and [source]" in entries["--config"]
