"""Options declared once (cache/options.py): every CLI option that names a configuration field is
generated from it (name, default, help), every other field is a `--set` field listed in the
command's help with its value per preset, and values parse back to what the field holds."""
from __future__ import annotations

import dataclasses

import click
import pytest
from click.testing import CliRunner

from cache.config import CacheConfig
from cache.errors import FFError
from cache.options import _fmt, default_of, field_docs, field_help, parse_field, parse_sets, settable
from cli import GLOBAL_OPTIONS, hoist_global_options, main
from pipelines.config import BakeConfig, EvalConfig, RunOptions, Setting, SweepGrid
from trainer.config import TrainConfig

CONFIGS = (CacheConfig, TrainConfig, EvalConfig, SweepGrid, Setting, BakeConfig, RunOptions)


def _options(command: click.Command) -> list[click.Option]:
    return [p for p in command.params if isinstance(p, click.Option) and p.name != "help"]


def test_every_field_option_is_its_field_name_default_and_help():
    """An option generated from a field carries the field's name, its default (or None where a
    preset decides, the presets' values then in the help) and its docstring; its default text
    parses back to the field's default."""
    checked = 0
    for name, command in main.commands.items():
        for opt in _options(command):
            f = getattr(opt, "ff_field", None)
            if f is None:
                continue
            assert opt.opts[0] == "--" + f.name.replace("_", "-"), (name, opt.opts)
            assert opt.help == field_help(f.cls, f.name, f.presets) and field_docs(f.cls)[f.name] in opt.help
            if f.presets:
                assert opt.default is None
                for preset, values in f.presets.items():
                    want = values.get(f.name, default_of(f.cls, f.name))
                    assert f"{preset}: {_fmt(want)}" in opt.help or f"[{_fmt(want)}]" in opt.help
            else:
                want = default_of(f.cls, f.name)
                assert (opt.default is None and want is None) or \
                    parse_sets(f.cls, [f"{f.name}={opt.default}"])[f.name] == want
            checked += 1
    assert checked >= 9  # cache 5, eval 3, run 1


def test_set_takes_exactly_the_fields_no_option_shows_and_the_help_lists_them():
    """A command's `--set` fields and its field options partition the configuration (global options
    aside); its help lists every `--set` field with its value under each preset."""
    for name, command in main.commands.items():
        sets = getattr(command.callback, "ff_sets", None)
        if sets is None:
            continue
        cls, exclude, presets = sets
        shown = {getattr(o, "ff_field").name for o in _options(command) if getattr(o, "ff_field", None)}
        assert shown <= set(exclude), name
        top = {n.split(".")[0] for n in settable(cls, exclude)}
        assert top | set(exclude) == {f.name for f in dataclasses.fields(cls)}, name
        help_text = CliRunner().invoke(main, [name, "--help"], terminal_width=200).output
        for full in settable(cls, exclude):
            assert f"  {full} = " in help_text, (name, full)
    train_help = CliRunner().invoke(main, ["train", "--help"]).output
    assert "steps = paper: 10000; demo: 500  (int)" in train_help
    assert "device = " not in train_help  # the SAE's device is `ff --device`


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_field_has_a_docstring_and_its_default_round_trips(cls):
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
        if dataclasses.is_dataclass(default_of(cls, f.name)):
            continue
        default = default_of(cls, f.name)
        text = _fmt(default)  # as the help shows it (a template's newline as \n)
        got = parse_field(cls, f.name, text)
        assert got == default, (cls.__name__, f.name, text, got)


def test_values_parse_by_annotation_and_bad_ones_are_one_line():
    sets = parse_sets(EvalConfig, ["multipliers=10,30", "grid.top_n=all,20", "formats=all", "max_questions=none",
                                   "gates=both", r"mcq_template=Q: {question}\nA:", "sweep_losses=false"])
    assert sets["grid"] == {"multipliers": (10.0, 30.0), "top_n": (None, 20), "gates": ("none", "sequence")}
    assert sets["formats"][0] == "plain" and len(sets["formats"]) == 7
    assert sets["max_questions"] is None and sets["sweep_losses"] is False
    assert sets["mcq_template"] == "Q: {question}\nA:"
    assert parse_sets(TrainConfig, ["steps=5", "steps=7"]) == {"steps": 7}  # the last one wins
    for items, message in ((["stepz=3"], "--set stepz: no such field here; did you mean steps"),
                           (["steps=many"], "--set steps=many: expected an integer"),
                           (["no_clustering=maybe"], "--set no_clustering=maybe: expected true or false"),
                           (["steps"], "--set takes FIELD=VALUE, got 'steps'")):
        with pytest.raises(FFError) as e:
            parse_sets(TrainConfig, items)
        assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_set_and_field_options_reach_the_config_and_their_checks_are_one_line(tmp_path):
    """Bad values go through the dataclass's own checks: one `error:` line, exit 2, before any work."""
    for args, needle in ((["train", "--store", str(tmp_path), "--out", str(tmp_path / "r"), "--set", "lr=0"],
                          "learning rates must be > 0, got lr=0.0"),
                         (["cache", "--out", str(tmp_path / "s"), "--set", "ctx_len=1"], "too small: ctx_len=1"),
                         (["cache", "--out", str(tmp_path / "s"), "--layers", "2,-1"], "non-negative"),
                         (["eval", "--run", str(tmp_path), "--formats", "plain,bogus"],
                          "unknown prompt format 'bogus'"),
                         (["eval", "--run", str(tmp_path), "--set", "gates=sometimes"], "unknown gate or selection"),
                         (["bake", "--run", str(tmp_path), "--out", str(tmp_path / "o"), "--set", "target=all"],
                          "the bake's target is corpus or gated"),
                         (["run", "--out", str(tmp_path / "x"), "--seeds", "0"], "seeds and contexts must be >= 1")):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2, (args, r.output)
        assert r.output.startswith("error: ") and needle in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists() and not (tmp_path / "r").exists() and not (tmp_path / "o").exists()


def test_global_options_may_follow_the_command():
    assert hoist_global_options(["cache", "--out", "s", "--quiet", "--device", "cpu", "--json"]) == \
        ["--quiet", "--device", "cpu", "--json", "cache", "--out", "s"]
    assert hoist_global_options(["eval", "--storage-options={}", "-q"]) == ["--storage-options={}", "-q", "eval"]
    assert hoist_global_options(["generate", "--", "--quiet"]) == ["generate", "--", "--quiet"]
    assert set(GLOBAL_OPTIONS) == {o for p in main.params if isinstance(p, click.Option) for o in p.opts} - {
        "--version", "--help", "-h"}


def test_the_command_line_stays_small():
    """ff eval at most 16 options, ff at most 55 in all (-h/--help not counted)."""
    counts = {name: len(_options(c)) for name, c in main.commands.items()}
    counts["ff"] = len([p for p in main.params if isinstance(p, click.Option)])
    assert counts["eval"] <= 16, counts
    assert sum(counts.values()) <= 55, counts
