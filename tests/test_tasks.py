import random
import re

import pytest

from tasks import (DOMAINS, GENERATORS, MAX_NEW_TOKENS, MAX_NEW_TOKENS_MIXED, examples, get_tokenizer,
                   mixed_examples, sample, split_of, tasks_fingerprint, verify, verify_mixed)


def test_tokenizer_round_trip_and_digits():
    enc = get_tokenizer()
    text = "add 487+356\n7+6=13 8+5+1=14 #### 843 | hop fg a"
    ids = enc.encode_ordinary(text)
    assert enc.decode(ids) == text
    digits = enc.encode_ordinary("1234567890")
    assert len(digits) == 10 and len(set(digits)) == 10  # every digit its own token
    assert enc.n_vocab < 512
    specials = [enc.encode_single_token(s) for s in ("<|bos|>", "<|eos|>", "<|pad|>")]
    assert len(set(specials)) == 3 and all(s >= 256 for s in specials)


@pytest.mark.parametrize("domain", DOMAINS)
def test_verifier(domain):
    ex = examples(domain, "test", 1)[0]
    ans = ex["answer"]
    assert verify(ex["completion"], ans) == 1.0  # the gold trace verifies
    wrong = "0" if ans != "0" else "1"
    assert verify(f"some steps #### {wrong}", ans) == 0.0
    assert verify(f"steps {ans} but no marker", ans) == 0.0
    assert verify(f"#### {wrong} then #### {ans}", ans) == 1.0  # only the last marker counts
    assert verify(f"#### {ans} then #### {wrong}", ans) == 0.0
    for garbage in ["", "####", "\x00\xff####", "#### " * 50, None, 17]:
        assert verify(garbage, ans) == 0.0


@pytest.mark.parametrize("domain", DOMAINS)
def test_gold_traces_verify_and_buggy_traces_differ(domain):
    rng = random.Random(0)
    n_wrong = 0
    for _ in range(300):
        gold = sample(domain, "train", rng, bug_rate=0.0)
        assert verify(gold["completion"], gold["answer"]) == 1.0
        buggy = sample(domain, "train", rng, bug_rate=1.0)
        n_wrong += verify(buggy["completion"], buggy["answer"]) == 0.0
    assert n_wrong / 300 > 0.3  # the buggy solver is often wrong
    if domain != "ok":  # ok's almost always is (test_ok_cannot_be_guessed)
        assert n_wrong / 300 < 0.95  # and the others' not always


def test_no_answer_is_the_majority():
    """A test split whose answers are mostly one value lets an expert that always gives it look
    strong (the bracket version of ok: 82% "no", and every RLVF expert learned to say only that)."""
    for d in DOMAINS:
        answers = [e["answer"] for e in examples(d, "test", 1000)]
        assert max(answers.count(a) for a in set(answers)) / len(answers) < 0.65, d
    oks = examples("ok", "test", 1000)
    verdicts = [e["answer"].split()[0] for e in oks]  # ok's answers name the subject: `yes cat`
    assert 0.35 < verdicts.count("yes") / len(verdicts) < 0.65
    assert len({e["prompt"] for e in oks}) > 900  # and many distinct sentences, not a few repeated


def test_ok_bug_agrees_with_the_nearest_noun():
    rng = random.Random(0)
    ex = sample("ok", "train", rng, bug_rate=1.0)
    words = ex["prompt"].split()
    assert ex["completion"].split()[0].split(":")[0] == words[-2]  # the noun just before the verb
    gold = sample("ok", "train", random.Random(0), bug_rate=0.0)
    assert gold["prompt"] == ex["prompt"]
    assert gold["completion"].split()[0].split(":")[0] in words[2:4]  # the head noun, after "ok? the" [adjective]
    assert gold["answer"].split()[1] == gold["completion"].split()[0].split(":")[0]  # the answer names it


def test_add_bug_only_drops_the_carry_steps():
    """Gold and buggy traces share every digit sum: the buggy one is the gold one without its `+1`s."""
    for i in range(200):
        gold = sample("add", "train", random.Random(i), bug_rate=0.0)["completion"].split(" #### ")[0]
        buggy = sample("add", "train", random.Random(i), bug_rate=1.0)["completion"].split(" #### ")[0]
        assert re.sub(r"(=\d+)\+1=\d+", r"\1", gold) == buggy  # `=10+1=11` -> `=10`


def test_ok_cannot_be_guessed():
    """The answer names the subject, so a trace that took the nearest noun is wrong whatever its yes
    or no: RLVF cannot gain by answering against its own trace, only by finding the head noun."""
    rng = random.Random(0)
    buggy = [sample("ok", "train", rng, bug_rate=1.0) for _ in range(500)]
    assert sum(verify(e["completion"], e["answer"]) for e in buggy) / 500 < 0.05


def test_domain_is_obvious_from_prompt():
    for d in DOMAINS:
        for ex in examples(d, "train", 20):
            assert ex["prompt"].split()[0] == {"add": "add", "bool": "bool", "pick": "pick", "ok": "ok?",
                                               "hop": "hop"}[d]


def test_splits_disjoint():
    for d in DOMAINS:
        test = {e["prompt"] for e in examples(d, "test", 500)}
        others = {e["prompt"] for s in ("train", "router") for e in examples(d, s, 3000)}
        assert test and not (test & others)
        assert all(split_of(p.strip()) == "test" for p in test)


def test_mixed_prompts():
    exs = mixed_examples("test", 40)
    assert len({e["domain"] for e in exs}) == 20  # every ordered pair of different domains
    ex = exs[0]
    a1, a2 = ex["answers"]
    assert verify_mixed(ex["completion"], ex["answers"]) == 1.0
    first, second = ex["completion"].split(" | ")
    assert verify_mixed(f"{first} | x #### {a2}z", ex["answers"]) == 0.0  # half right
    assert verify_mixed(f"{first}", ex["answers"]) == 0.0  # second answer missing
    assert verify_mixed(f"a #### {a2} | b #### {a1}", ex["answers"]) == (1.0 if a1 == a2 else 0.0)
    assert verify_mixed(None, ex["answers"]) == 0.0


def test_lengths_fit_generation_budget():
    enc = get_tokenizer()
    for d in DOMAINS:
        for ex in examples(d, "train", 300):
            assert len(enc.encode_ordinary(ex["completion"])) + 1 <= MAX_NEW_TOKENS
    for ex in mixed_examples("train", 300):
        assert len(enc.encode_ordinary(ex["completion"])) + 1 <= MAX_NEW_TOKENS_MIXED


def test_unknown_domain_raises_clearly():
    with pytest.raises(ValueError, match="unknown domain"):
        sample("chess", "train", random.Random(0))
    assert set(GENERATORS) == set(DOMAINS)


def test_tasks_fingerprint_is_stable_and_sees_a_changed_generator(monkeypatch):
    fp = tasks_fingerprint()
    assert tasks_fingerprint() == fp and len(fp) == 16

    gen_hop = GENERATORS["hop"]

    def hop_with_other_facts(rng, bug):  # as an edit of tasks.py that changes what one domain generates
        q, trace, ans = gen_hop(rng, bug)
        return q, trace.replace("=", "=>"), ans
    monkeypatch.setitem(GENERATORS, "hop", hop_with_other_facts)
    assert tasks_fingerprint() != fp
