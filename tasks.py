"""
The five domains and the offline tokenizer.

Each domain is a seeded generator of (prompt, gold trace, answer) plus one exact verifier. They
mirror the paper's five benchmarks in kind:

    add   math word problem (GSM8K)   multi-digit addition, column by column with carries
    bool  yes/no question (BoolQ)     a boolean chain evaluated left to right
    pick  multiple choice (ARC)       which option holds the largest number
    ok    acceptability (CoLA)        does the verb agree with its subject
    hop   knowledge question (MedQA)  multi-hop lookup in facts the model must memorize

A completion is a step-by-step trace ending in `#### answer` (as in GSM8K); the verifier reads only
what follows the last marker. A mixed prompt asks two questions of two domains joined by " | " and
is answered in order, the two answers joined the same way.

Each domain also has a *buggy* solver: a plausible systematic mistake (dropping carries, ignoring
`not`, comparing only the ones digit, agreeing with the nearest noun, misremembered facts). Pretraining
traces come from the buggy solver more often than not, which makes the base model a fluent but
unreliable reasoner: greedy decoding follows the bug, sampling sometimes finds the right way. That
is the gap reinforcement learning from verifiable feedback has to close.
"""
import hashlib
import json
import random
import zlib

import tiktoken

DOMAINS = ["add", "bool", "pick", "ok", "hop"]
SPLITS = ["train", "router", "test"]
MARK = "####"
SEP = " | "
MAX_NEW_TOKENS = 64  # longest completion of any domain is 47 tokens with EOS (bool)
MAX_NEW_TOKENS_MIXED = 112  # two completions and the separator: at most 84

# ---------------------------------------------------------------------------------------------
# tokenizer: byte-level ranks (every character, so every digit, is its own token) + specials


def get_tokenizer():
    ranks = {bytes([i]): i for i in range(256)}
    specials = {"<|bos|>": 256, "<|eos|>": 257, "<|pad|>": 258}
    return tiktoken.Encoding(name="nanomor-bytes", pat_str=r"\d|[^\d]+", mergeable_ranks=ranks,
                             special_tokens=specials)


def tokenizer_info(enc):
    """What a checkpoint stores to prove it was trained with this tokenizer."""
    return {"name": enc.name, "n_vocab": enc.n_vocab, "bos": enc.encode_single_token("<|bos|>"),
            "eos": enc.encode_single_token("<|eos|>"), "pad": enc.encode_single_token("<|pad|>")}


# ---------------------------------------------------------------------------------------------
# the domains: gen(rng, bug) -> (question, trace, answer)

def gen_add(rng, bug):
    # column by column from the ones digit: the column's sum, then the carry in, as a step of its own
    # (`4+6=10+1=11`). The bug drops every carry, so the buggy trace is the gold one without its `+1`
    # steps: both practise every digit sum, and the skill RLVF has to find is the carry alone (with
    # `4+6+1=11` in one step, the three-term sums came only from gold traces, and some seeds' bases
    # never learned them: RLVF cannot find what sampling never writes)
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    da, db = str(a)[::-1], str(b)[::-1]
    steps, digits, carry = [], [], 0
    for x, y in zip(da, db):
        s = int(x) + int(y)
        step = f"{x}+{y}={s}"
        if carry:
            s += 1
            step += f"+1={s}"
        steps.append(step)
        digits.append(str(s % 10))
        carry = 0 if bug else s // 10  # the bug: every carry is dropped
    if carry:
        digits.append("1")
    answer = "".join(reversed(digits))
    return f"add {a}+{b}", " ".join(steps), answer


def gen_bool(rng, bug):
    # one `not` per question: with several, an xor chain is right whenever an even number of them are
    # misread, so near the base's error rate misreading fewer earns no more reward and RLVF has no
    # slope to climb (it did not: +4 to +22 points over the base, README)
    n = rng.randint(3, 4)
    negated = rng.randrange(n)
    lits = [("not " if i == negated else "") + rng.choice("TF") for i in range(n)]
    ops = rng.choices(["and", "or", "xor"], weights=[1, 1, 2], k=n - 1)
    q = "bool " + " ".join(x for pair in zip(lits, ops + [""]) for x in pair).strip()
    steps, vals = [], []
    for lit in lits:
        if lit.startswith("not "):
            v = lit[-1] if bug else ("F" if lit[-1] == "T" else "T")  # the bug: `not` is ignored
            steps.append(f"{lit}={v}")
            vals.append(v)
        else:
            vals.append(lit)
    acc = vals[0]
    for op, v in zip(ops, vals[1:]):
        x, y = acc == "T", v == "T"
        r = {"and": x and y, "or": x or y, "xor": x != y}[op]
        steps.append(f"{acc} {op} {v}={'T' if r else 'F'}")
        acc = "T" if r else "F"
    return q, " ".join(steps), "yes" if acc == "T" else "no"


def gen_pick(rng, bug):
    ones = rng.sample(range(10), 4)  # distinct ones digits, so the buggy order has no ties either
    nums = [rng.randint(1, 9) * 10 + o for o in ones]
    letters = "ABCD"
    key = (lambda n: n % 10) if bug else (lambda n: n)  # the bug: only the ones digit is compared
    best = 0
    steps = [f"A{nums[0]}"]
    for i in range(1, 4):
        bigger = key(nums[i]) > key(nums[best])
        steps.append(f"{letters[i]}{nums[i]}{'>' if bigger else '<'}{letters[best]}{nums[best]}")
        if bigger:
            best = i
    q = "pick max " + " ".join(f"{letters[i]}:{n}" for i, n in enumerate(nums))
    return q, " ".join(steps), letters[best]


NOUNS = ["cat", "dog", "bird", "fox", "cow", "hen", "pig", "rat", "owl", "bee", "ant", "elk", "yak", "ram", "emu", "bat"]
VERBS = ["run", "sing", "jump", "swim", "sleep", "eat", "hide", "bark", "dig", "sit"]
PREPS = ["near", "by", "with", "behind", "under", "past"]
ADJS = ["big", "small", "red", "old", "shy", "wet"]


def gen_ok(rng, bug):
    # subject-verb agreement across a prepositional phrase ("the cat near the dogs runs"), the kind
    # of judgment CoLA asks for. The answer names the subject it judged (`yes cat`), so that a yes or
    # no guessed after any trace is wrong: the buggy answer names the nearest noun and is right only
    # when both nouns are the same word. The second noun has the other number 3 times in 4
    def noun_phrase(plural):
        adj = rng.choice([""] + ADJS)
        return f"the {adj + ' ' if adj else ''}{rng.choice(NOUNS)}{'s' if plural else ''}"
    head_plural = rng.random() < 0.5
    near_plural = head_plural != (rng.random() < 0.75)
    verb_plural = rng.random() < 0.5
    verb = rng.choice(VERBS) + ("" if verb_plural else "s")
    head, near = noun_phrase(head_plural), noun_phrase(near_plural)
    subject, subject_plural = (near, near_plural) if bug else (head, head_plural)  # the bug: the nearest noun
    noun = subject.split()[-1]
    number = lambda plural: "pl" if plural else "sg"
    trace = f"{noun}:{number(subject_plural)} {verb}:{number(verb_plural)}"
    q = f"ok? {head} {rng.choice(PREPS)} {near} {verb}"
    return q, trace, ("yes " if subject_plural == verb_plural else "no ") + noun


ENTITIES = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
RELATIONS = "fgh"


def _knowledge():
    """The facts of the hop domain: three fixed random maps over 52 entities, and for half of
    the (relation, entity) pairs a misremembered value that buggy pretraining traces use."""
    rng = random.Random(1234)
    true, wrong = {}, {}
    for r in RELATIONS:
        perm = list(ENTITIES)
        rng.shuffle(perm)
        for e, v in zip(ENTITIES, perm):
            true[r, e] = v
            if rng.random() < 1 / 2:
                wrong[r, e] = rng.choice([x for x in ENTITIES if x != v])
    return true, wrong


FACTS, WRONG_FACTS = _knowledge()


def gen_hop(rng, bug):
    rels = "".join(rng.choice(RELATIONS) for _ in range(rng.randint(2, 3)))
    x = rng.choice(ENTITIES)
    q = f"hop {rels} {x}"
    steps = []
    for r in rels:
        y = WRONG_FACTS.get((r, x), FACTS[r, x]) if bug else FACTS[r, x]
        steps.append(f"{r}({x})={y}")
        x = y
    return q, " ".join(steps), x


GENERATORS = {"add": gen_add, "bool": gen_bool, "pick": gen_pick, "ok": gen_ok, "hop": gen_hop}


# ---------------------------------------------------------------------------------------------
# verification

def extract_answer(completion):
    """Text after the last marker, or None when there is no marker."""
    if MARK not in completion:
        return None
    return completion.rsplit(MARK, 1)[1].strip()


def verify(completion, answer):
    """1.0 if the text after the last `####` equals the answer, else 0.0. Never raises."""
    return float(extract_answer(completion) == answer) if isinstance(completion, str) else 0.0


def verify_mixed(completion, answers):
    """A mixed answer is right only when each of its parts is right, in order."""
    parts = completion.split("|") if isinstance(completion, str) else []
    if len(parts) != len(answers):
        return 0.0
    return float(all(verify(p, a) for p, a in zip(parts, answers)))


# ---------------------------------------------------------------------------------------------
# splits: a prompt belongs to exactly one split, by a hash of its text, so test prompts can never
# appear in training however many examples are drawn

def split_of(question):
    h = zlib.crc32(question.encode()) % 10
    return "test" if h == 0 else "router" if h == 1 else "train"


def sample(domain, split, rng, bug_rate=0.0):
    """One example of `domain` from `split`: dict(domain, prompt, completion, answer). The trace is
    the buggy solver's with probability bug_rate (the buggy trace's answer is the buggy one)."""
    if domain not in GENERATORS:
        raise ValueError(f"unknown domain {domain!r} (known: {', '.join(DOMAINS)})")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
    while True:
        state = rng.getstate()
        bug = rng.random() < bug_rate
        q, trace, ans = GENERATORS[domain](rng, bug)
        if split_of(q) == split:
            break
    rng.setstate(state)  # redo with the same draws to get the true answer alongside
    rng.random()
    _, _, true_ans = GENERATORS[domain](rng, False)
    return {"domain": domain, "prompt": q + "\n", "completion": f"{trace} {MARK} {ans}",
            "answer": true_ans}


def join_mixed(a, b):
    """One mixed example from two single-domain ones: both questions in one prompt, answered in order."""
    return {"domain": f"{a['domain']}+{b['domain']}", "prompt": a["prompt"].strip() + SEP + b["prompt"],
            "completion": a["completion"] + SEP + b["completion"], "answers": [a["answer"], b["answer"]]}


def sample_mixed(d1, d2, split, rng, bug_rate=0.0):
    """Two questions of two domains in one prompt, answered in order."""
    return join_mixed(sample(d1, split, rng, bug_rate), sample(d2, split, rng, bug_rate))


def stream_rng(domain, split, seed):
    """A distinct, reproducible random stream per (domain, split, seed)."""
    return random.Random(f"{domain}/{split}/{seed}")


def examples(domain, split, n, seed=0):
    rng = stream_rng(domain, split, seed)
    return [sample(domain, split, rng) for _ in range(n)]


def mixed_examples(split, n, seed=0):
    """n mixed prompts cycling through every ordered pair of different domains."""
    rng = stream_rng("mixed", split, seed)
    pairs = [(a, b) for a in DOMAINS for b in DOMAINS if a != b]
    return [sample_mixed(*pairs[i % len(pairs)], split, rng) for i in range(n)]


def tasks_fingerprint(n=20):
    """A short hash of what the domains generate: the first n examples of every domain and split, gold
    and buggy traces, and a mixed one. The base stores it; a base pretrained before tasks.py changed is
    refused (common.load_base) where it, and every expert on it, would otherwise be scored silently."""
    h = hashlib.sha256(json.dumps([DOMAINS, SPLITS, MARK, SEP]).encode())
    for d in DOMAINS:
        for split in SPLITS:
            rng = stream_rng(d, split, 0)
            for _ in range(n):
                h.update(json.dumps(sample(d, split, rng, bug_rate=0.5), sort_keys=True).encode())
    h.update(json.dumps(mixed_examples("test", 2), sort_keys=True).encode())
    return h.hexdigest()[:16]


def score(example, completion):
    if "answers" in example:
        return verify_mixed(completion, example["answers"])
    return verify(completion, example["answer"])


if __name__ == "__main__":
    rng = random.Random(0)
    for d in DOMAINS:
        for bug in (0.0, 1.0):
            ex = sample(d, "train", rng, bug)
            print(f"[{d} bug={bug:.0f}] {ex['prompt'].strip()}  ->  {ex['completion']}   (answer {ex['answer']})")
    ex = sample_mixed("add", "hop", "train", rng)
    print(f"[mixed] {ex['prompt'].strip()}  ->  {ex['completion']}")
