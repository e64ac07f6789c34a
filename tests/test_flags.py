"""Every flag of every script, fed a value outside its declared rule, ends in one clear line naming the
flag and changes nothing. The bad values are derived from the rules themselves (common.FLAGS for the
presets' keys, add_argument(rule=...) for a script's own flags), so a flag is covered the day it is
added, and a flag without a rule fails here."""
import importlib
import os
import subprocess
import sys

import pytest

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# each script and the flags it needs to get as far as checking the rest
SCRIPTS = {"pretrain": ["--preset", "smoke"], "train_expert": ["--preset", "smoke", "--domain", "add"],
           "distill": ["--preset", "smoke"], "train_router": ["--preset", "smoke"], "eval": ["--preset", "smoke"],
           "summary": ["--preset", "smoke"], "sweep": ["--preset", "smoke"], "bench_pretrain": ["--preset", "smoke"],
           "bench_generate": ["--preset", "smoke"], "kernels": []}


class Parsed(Exception):
    pass


def parser_of(script, monkeypatch):
    """The script's own parser, caught when it checks the rules of its parsed flags."""
    def caught(self, args):
        raise Parsed(self)
    monkeypatch.setattr(common.Parser, "check_rules", caught)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *SCRIPTS[script]])
    with pytest.raises(Parsed) as e:
        importlib.import_module(script).main()
    return e.value.args[0]


def outside(rule):
    """A value that breaks the rule (None for text, which the script checks itself)."""
    rule = rule.split(", ")[0]
    if rule == "text":
        return None
    if rule == "bool":
        return "maybe"
    if rule.startswith("list "):
        return f"{inside(rule[len('list '):])},{outside(rule[len('list '):])}"  # one good item, one bad
    if "|" in rule:
        return "nonsense"
    if ".." in rule:
        return str(float(rule.split("..")[1]) + 1)
    op, bound = rule.split()
    return str(int(float(bound)) - 1) if op == ">=" else bound


def inside(rule):
    if "|" in rule:
        return rule.split("|")[0]
    return rule.split()[1]  # ">= b" (a list item is a whole number; "> b" lists do not occur)


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_every_flag_has_a_rule_and_a_value_outside_it_is_one_line(script, tmp_path, monkeypatch, capsys):
    parser = parser_of(script, monkeypatch)
    monkeypatch.undo()
    flags = [a for a in parser._actions if a.option_strings and a.nargs != 0]  # not --help, --resume
    assert len(flags) >= 3
    (tmp_path / "kept").write_text("earlier output")
    checked = 0
    for action in flags:
        name = action.option_strings[0]
        assert action.dest in parser.rules, f"{script}.py {name} has no rule (declare one: FLAGS or rule=)"
        bad = outside(parser.rules[action.dest])
        if bad is None:
            continue
        monkeypatch.setattr(sys, "argv", [f"{script}.py", *SCRIPTS[script], "--out_dir", str(tmp_path), name, bad])
        with pytest.raises(SystemExit) as e:
            importlib.import_module(script).main()
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and name in err[0], \
            (script, name, bad, err)
        checked += 1
    assert sorted(os.listdir(tmp_path)) == ["kept"] and (tmp_path / "kept").read_text() == "earlier output"
    assert checked >= 2


def test_the_rules_read_as_declared():
    assert common.obeys(0.0, "0..1") and common.obeys(1.0, "0..1") and not common.obeys(1.01, "0..1")
    assert common.obeys(2, ">= 2") and not common.obeys(1, ">= 2")
    assert not common.obeys(0.0, "> 0") and not common.obeys(float("nan"), "> 0")
    assert common.obeys("0,16", "list >= 0") and not common.obeys("0,,16", "list >= 0")
    assert not common.obeys("1.5", "list >= 0") and not common.obeys("", "list >= 0")
    assert common.obeys("add,hop", "list add|hop") and not common.obeys("add,ho", "list add|hop")
    assert common.describe("list a|b") == "a comma-separated list, each one of a, b"
    # every key of every preset has a rule, and every preset's own value obeys it
    for preset in common.PRESETS.values():
        for section in preset.values():
            for key, val in section.items():
                assert common.obeys(val, common.FLAGS[key].split(", ")[0]), (key, val)


def test_a_width_that_heads_do_not_divide_is_refused(capsys):
    with pytest.raises(SystemExit):
        common.parse_args("", ["model"], argv=["--preset", "smoke", "--n_head", "3"])
    assert capsys.readouterr().err == "error: --n_embd must be a multiple of --n_head (got 32 and 3)\n"


def test_zero_means_what_the_help_says(capsys):
    """A rule's note after the comma reaches --help, where 0 has a meaning."""
    with pytest.raises(SystemExit):
        common.parse_args("", ["expert"], argv=["--preset", "smoke", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "0: never checkpoint" in out and "0: only at the end" in out and "0: all rows at once" in out


@pytest.mark.parametrize("env,args,message", [
    ({}, ["cpus"], "error: unknown argument 'cpus' (usage: bash run.sh [smoke|cpu|gpu] [--force] [--seed S] [--seeds N])"),
    ({}, ["smoke", "--seeds", "0"], "error: --seeds must be at least 1"),
    ({}, ["smoke", "--seed", "x"], "error: --seed must be a non-negative integer (got 'x')"),
    ({}, ["smoke", "--seed", "-1"], "error: --seed must be a non-negative integer (got '-1')"),
    ({}, ["smoke", "--seeds"], "error: --seeds needs a value"),
    ({"JOBS": "0"}, ["smoke"], "error: JOBS must be a positive integer (got '0')"),
    ({"CORES": "two"}, ["smoke"], "error: CORES must be a positive integer (got 'two')"),
])
def test_run_sh_refuses_a_bad_option_and_writes_nothing(tmp_path, env, args, message):
    out = tmp_path / "out"
    r = subprocess.run(["bash", "run.sh", *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, OUT_DIR=str(out), PYTHON=sys.executable, **env))
    assert r.returncode == 2 and r.stderr.strip().startswith(message) and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()
