"""Long-context tasks: passkey retrieval, RULER-style tasks in the essays, and fidelity vs dense.

Every retrieval sample is built directly in token ids, so its length is exact: the prompt has
at most ``ctx - max_new_tokens`` tokens and prompt plus answer fit in ``ctx``. Needles are inserted
at a requested depth (0 = start of the haystack, 1 = end), snapped to a sentence boundary.

* ``passkey``: a 5-digit key in repeated filler (Mohtashami & Jaggi, 2023).
* ``niah_single``: one "special magic number" needle in the essays (RULER's NIAH, Hsieh et al., 2024).
* ``niah_multikey``: the queried needle plus 3 distractor needles with other keys.
* ``niah_multivalue``: 4 needles with the same key and different values; all must be recalled.
* ``niah_multiquery``: 4 needles with different keys; all 4 are asked for.
* ``variable_tracking``: RULER's variable tracking: ``VAR A = 12345.`` then 4 hops ``VAR B = VAR A.``
  ... in repeated filler; the value's assignment sits at the swept depth, each hop at a random later
  depth; all 5 names that hold the value are asked for.
* ``common_words``: RULER's common-words extraction: a numbered list of essay words where 10 words
  appear 30 times each (fewer when the context is short) and the others 3 times; the 10 most common
  are asked for, scored as whole words. The depth only seeds the sample.
* ``fidelity``: not a prompt task; see :func:`fidelity_windows` and ``evaluate.fidelity_metrics``.

A sample's score is the fraction of its expected answers found in the generated text (RULER's
string-match recall), so accuracy is in [0, 1].

Prompt formats: ``plain`` is the text alone after the tokenizer's BOS; ``chat`` puts the task (the
instructions, the haystack and the question) in the user turn of the model's chat template and
opens the assistant's turn with the answer prefix ("The pass key is").
"""

from __future__ import annotations

import math
import random
import re
import string
from dataclasses import dataclass, field
from typing import Sequence

__all__ = [
    "PROMPT_FORMATS",
    "RETRIEVAL_TASKS",
    "TASKS",
    "Sample",
    "build_samples",
    "fidelity_windows",
    "needs_essays",
    "score_sample",
    "score_text",
]

RETRIEVAL_TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery",
                   "variable_tracking", "common_words")
TASKS = RETRIEVAL_TASKS + ("fidelity",)
PROMPT_FORMATS = ("plain", "chat")

# Tokens each task may generate: enough for its answers, few enough to keep CPU runs short.
ANSWER_TOKENS = {
    "passkey": 8,
    "niah_single": 12,
    "niah_multikey": 12,
    "niah_multivalue": 40,
    "niah_multiquery": 40,
    "variable_tracking": 30,
    "common_words": 48,
}

_KEY_WORDS = (
    "amber", "brisk", "calm", "dusty", "eager", "fancy", "gentle", "hollow", "icy", "jolly",
    "lucky", "misty", "noble", "olive", "proud", "quiet", "rapid", "silver", "tidy", "urban",
    "vivid", "witty", "young", "zesty",
)
_KEY_NOUNS = (
    "anchor", "badger", "candle", "dragon", "engine", "falcon", "garden", "harbor", "island",
    "jacket", "kettle", "lantern", "meadow", "needle", "orchid", "pepper", "quarry", "river",
    "saddle", "tunnel", "violin", "walrus", "yacht", "zipper",
)

_PASSKEY_PREFIX = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
                   "memorize it. I will quiz you about the important information there.\n\n")
_PASSKEY_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
                   "There and back again. ")
_PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
_PASSKEY_QUESTION = ("\n\nWhat is the pass key?", "The pass key is")

_NIAH_PREFIX = ("Some special magic numbers are hidden within the following text. Make sure to "
                "memorize it. I will quiz you about the numbers afterwards.\n\n")
_NIAH_NEEDLE = " One of the special magic numbers for {key} is: {value}. "
_NIAH_QUESTION_ONE = ("\n\nWhat is the special magic number for {key} mentioned in the provided text?",
                      "The special magic number for {key} mentioned in the provided text is")
_NIAH_QUESTION_ALL = ("\n\nWhat are all the special magic numbers for {key} mentioned in the provided text?",
                      "The special magic numbers for {key} mentioned in the provided text are")

_VT_PREFIX = ("Memorize and follow the chain of variable assignments hidden in the following text.\n\n")
_VT_FIRST = " VAR {name} = {value}. "
_VT_HOP = " VAR {name} = VAR {prev}. "
_VT_QUESTION = ("\n\nQuestion: Which variables are assigned the value {value} in the text above?",
                "Answer: Following the chain of assignments, the variables assigned the value {value} are:")
VT_HOPS = 4  # variables that copy the value: the answer has VT_HOPS + 1 names

_CWE_PREFIX = ("Below is a numbered list of words. Some words appear more often than others. "
               "Memorize the ones that appear most often.\n\n")
_CWE_QUESTION = ("\nQuestion: What are the {n} most common words in the list above?",
                 "Answer: The {n} words that appear most often in the list are:")
CWE_COMMON, CWE_FREQ_COMMON, CWE_FREQ_RARE = 10, 30, 3

_SENTENCE_END = re.compile(r"[.!?]\s*$")


@dataclass
class Sample:
    task: str
    prompt_ids: list[int]
    answers: list[str]  # strings expected in the generated text
    depth: float
    max_new_tokens: int
    meta: dict = field(default_factory=dict)
    whole_words: bool = False  # score answers as whole words, case-insensitive (common_words)


def score_text(answers: Sequence[str], text: str, *, whole_words: bool = False) -> float:
    """Fraction of ``answers`` present in ``text`` (RULER's string-match recall); with ``whole_words``,
    as case-insensitive whole words."""
    if not answers:
        return 0.0
    if whole_words:
        found = [re.search(rf"\b{re.escape(a.lower())}\b", text.lower()) is not None for a in answers]
    else:
        found = [a in text for a in answers]
    return sum(found) / len(answers)


def score_sample(sample: Sample, text: str) -> float:
    return score_text(sample.answers, text, whole_words=sample.whole_words)


def needs_essays(task: str) -> bool:
    return task not in ("passkey", "variable_tracking")


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


_CHAT_MARK = "\x00TASK\x00"


class _Frame:
    """Where a task's text sits in the prompt (see the module doc): ``prefix(instructions)`` opens it,
    ``suffix(question, answer_prefix)`` closes it."""

    def __init__(self, tokenizer, prompt_format: str):
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"Unknown prompt format {prompt_format!r}; choose one of {', '.join(PROMPT_FORMATS)}.")
        self.tokenizer = tokenizer
        self.chat = prompt_format == "chat"
        if self.chat:
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError("The tokenizer has no chat template; use the plain prompt format "
                                 "(--prompt-format plain).")
            text = tokenizer.apply_chat_template([{"role": "user", "content": _CHAT_MARK}],
                                                 add_generation_prompt=True, tokenize=False)
            head, tail = text.split(_CHAT_MARK)
            self.head, self.tail = _ids(tokenizer, head), _ids(tokenizer, tail)
        else:
            self.head, self.tail = _bos(tokenizer), []

    def prefix(self, instructions: str) -> list[int]:
        return self.head + _ids(self.tokenizer, instructions)

    def suffix(self, question: str, answer_prefix: str) -> list[int]:
        if self.chat:
            return _ids(self.tokenizer, question) + self.tail + _ids(self.tokenizer, answer_prefix)
        return _ids(self.tokenizer, f"{question} {answer_prefix}")


def _bos(tokenizer) -> list[int]:
    """BOS id if the tokenizer adds one to plain text (so prompts look like tokenizer(text))."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return with_special[: len(with_special) - len(without)] if with_special[-len(without):] == without else []


class _SentenceSnapper:
    """Finds the sentence boundary nearest a position in a token sequence."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._memo: dict[int, bool] = {}

    def ends_sentence(self, token_id: int) -> bool:
        if token_id not in self._memo:
            self._memo[token_id] = bool(_SENTENCE_END.search(self.tokenizer.decode([token_id])))
        return self._memo[token_id]

    def snap(self, ids: Sequence[int], pos: int, radius: int = 256) -> int:
        """Position after the sentence end nearest ``pos`` (``pos`` itself if none within radius)."""
        if pos <= 0 or pos >= len(ids):
            return max(0, min(pos, len(ids)))
        for delta in range(radius):
            for p in (pos - delta, pos + delta):
                if 0 < p <= len(ids) and self.ends_sentence(ids[p - 1]):
                    return p
        return pos


def _assemble(prefix: list[int], filler: list[int], needles: list[tuple[float, list[int]]],
              question: list[int], snapper: _SentenceSnapper) -> list[int]:
    """prefix + filler with each needle inserted at its depth (sentence-snapped) + question."""
    cuts = sorted((snapper.snap(filler, round(depth * len(filler))), i) for i, (depth, _) in enumerate(needles))
    out, prev = list(prefix), 0
    for cut, i in cuts:
        out += filler[prev:cut] + needles[i][1]
        prev = cut
    return out + filler[prev:] + question


def _filler_budget(ctx: int, max_new: int, *parts: list[int]) -> int:
    budget = ctx - max_new - sum(len(p) for p in parts)
    if budget < 16:
        raise ValueError(f"ctx={ctx} is too short for this task: the instructions, needles and answer "
                         f"already take {ctx - budget} tokens; use a larger --ctx.")
    return budget


def _magic_number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _keys(rng: random.Random, n: int) -> list[str]:
    pairs = rng.sample([(a, b) for a in _KEY_WORDS for b in _KEY_NOUNS], n)
    return [f"{a}-{b}" for a, b in pairs]


def _passkey_sample(tokenizer, ctx: int, depth: float, rng: random.Random, snapper, frame: _Frame) -> Sample:
    max_new = ANSWER_TOKENS["passkey"]
    key = str(rng.randint(10_000, 99_999))
    prefix = frame.prefix(_PASSKEY_PREFIX)
    needle = _ids(tokenizer, _PASSKEY_NEEDLE.format(key=key))
    question = frame.suffix(*_PASSKEY_QUESTION)
    filler = _repeated_filler(tokenizer, _filler_budget(ctx, max_new, prefix, needle, question))
    ids = _assemble(prefix, filler, [(depth, needle)], question, snapper)
    return Sample("passkey", ids, [key], depth, max_new, {"key": key})


def _repeated_filler(tokenizer, budget: int) -> list[int]:
    """The filler unit repeated, then as many of its first sentences as fit: at most ``budget`` tokens
    of whole sentences, so the haystack ends cleanly before the question."""
    unit = _ids(tokenizer, _PASSKEY_FILLER)
    filler = unit * (budget // len(unit))
    sentences = _PASSKEY_FILLER.split(". ")
    heads = (_ids(tokenizer, ". ".join(sentences[:k]) + ". ") for k in range(len(sentences) - 1, 0, -1))
    return filler + next((h for h in heads if len(filler) + len(h) <= budget), [])


def _niah_sample(task: str, tokenizer, haystack: list[int], ctx: int, depth: float,
                 rng: random.Random, snapper, frame: _Frame) -> Sample:
    max_new = ANSWER_TOKENS[task]
    n_needles = 1 if task == "niah_single" else 4
    keys = _keys(rng, n_needles)
    if task == "niah_multivalue":
        keys = [keys[0]] * n_needles
    values = [_magic_number(rng) for _ in range(n_needles)]
    needles_text = [_NIAH_NEEDLE.format(key=k, value=v) for k, v in zip(keys, values)]
    if task in ("niah_single", "niah_multikey"):
        template, key, answers = _NIAH_QUESTION_ONE, keys[0], [values[0]]
    elif task == "niah_multivalue":
        template, key, answers = _NIAH_QUESTION_ALL, keys[0], values
    else:  # niah_multiquery
        template, key, answers = _NIAH_QUESTION_ALL, ", ".join(keys[:-1]) + f" and {keys[-1]}", values
    prefix = frame.prefix(_NIAH_PREFIX)
    needles = [_ids(tokenizer, t) for t in needles_text]
    question = frame.suffix(*(t.format(key=key) for t in template))
    filler = _essay_span(haystack, _filler_budget(ctx, max_new, prefix, question, *needles), rng, snapper)
    # The queried needle sits at the swept depth; the others at random depths.
    depths = [depth] + [rng.random() for _ in range(n_needles - 1)]
    ids = _assemble(prefix, filler, list(zip(depths, needles)), question, snapper)
    return Sample(task, ids, answers, depth, max_new, {"keys": keys, "values": values})


def _essay_span(haystack: list[int], budget: int, rng: random.Random, snapper) -> list[int]:
    """``budget`` tokens of the essays from a random sentence start."""
    if len(haystack) < budget:
        raise ValueError(f"The essays hold {len(haystack)} tokens, fewer than the {budget} this ctx needs.")
    start = snapper.snap(haystack, rng.randint(0, len(haystack) - budget - 1))
    start = min(start, len(haystack) - budget)
    return haystack[start:start + budget]


def _variable_name(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_uppercase, k=5))


def _variable_tracking_sample(tokenizer, ctx: int, depth: float, rng: random.Random, snapper,
                              frame: _Frame) -> Sample:
    max_new = ANSWER_TOKENS["variable_tracking"]
    value = str(rng.randint(10_000, 99_999))
    names: list[str] = []
    while len(names) < VT_HOPS + 1:
        name = _variable_name(rng)
        if name not in names:
            names.append(name)
    statements = [_VT_FIRST.format(name=names[0], value=value)]
    statements += [_VT_HOP.format(name=n, prev=p) for p, n in zip(names, names[1:])]
    needles = [_ids(tokenizer, t) for t in statements]
    prefix = frame.prefix(_VT_PREFIX)
    question = frame.suffix(*(t.format(value=value) for t in _VT_QUESTION))
    filler = _repeated_filler(tokenizer, _filler_budget(ctx, max_new, prefix, question, *needles))
    # The value's assignment at the swept depth, each hop later (the chain reads in order).
    depths = [depth] + sorted(depth + (1.0 - depth) * rng.random() for _ in range(VT_HOPS))
    ids = _assemble(prefix, filler, list(zip(depths, needles)), question, snapper)
    return Sample("variable_tracking", ids, names, depth, max_new, {"value": value})


def _word_pool(essays: str) -> list[str]:
    """Distinct lower-case words of 4-10 letters in the essays, sorted (deterministic)."""
    return sorted(set(re.findall(r"\b[a-z]{4,10}\b", essays)))


def _common_words_sample(tokenizer, pool: list[str], ctx: int, depth: float, rng: random.Random,
                         frame: _Frame) -> Sample:
    max_new = ANSWER_TOKENS["common_words"]
    prefix = frame.prefix(_CWE_PREFIX)
    question = frame.suffix(*(t.format(n=CWE_COMMON) for t in _CWE_QUESTION))
    budget = _filler_budget(ctx, max_new, prefix, question)
    words = rng.sample(pool, len(pool))
    common = words[:CWE_COMMON]

    def numbered(n_rare: int) -> list[int]:
        entries = common * freq_common + words[CWE_COMMON:CWE_COMMON + n_rare] * freq_rare
        rng.shuffle(entries)
        return [t for i, w in enumerate(entries, 1) for t in _ids(tokenizer, f"{i}. {w}\n")]

    per_entry = sum(len(_ids(tokenizer, f"{i}. {w}\n")) for i, w in enumerate(words[:50], 100)) / min(len(pool), 50)
    # Common words fill at most half the list; short contexts repeat them less (but more than the rest).
    freq_common = max(2, min(CWE_FREQ_COMMON, int(budget / (2 * CWE_COMMON * per_entry))))
    freq_rare = min(CWE_FREQ_RARE, freq_common - 1)
    n_rare = int((budget - CWE_COMMON * freq_common * per_entry) / (freq_rare * per_entry))
    for _ in range(8):  # refine the entry count from the measured tokens per entry
        body = numbered(n_rare)
        slack = budget - len(body)
        if 0 <= slack < 2 * freq_rare * per_entry:
            break
        per_entry = len(body) / (CWE_COMMON * freq_common + n_rare * freq_rare)
        n_rare += math.floor(slack / (freq_rare * per_entry))
    while len(body) > budget and n_rare > 0:
        n_rare -= 1
        body = numbered(n_rare)
    if len(body) > budget or n_rare < 1:
        raise ValueError(f"ctx={ctx} is too short for common_words; use a larger --ctx.")
    if CWE_COMMON + n_rare > len(pool):
        raise ValueError(f"The essays hold {len(pool)} distinct words, fewer than the {CWE_COMMON + n_rare} "
                         f"common_words needs at ctx={ctx}.")
    return Sample("common_words", prefix + body + question, common, depth, max_new,
                  {"freq_common": freq_common, "freq_rare": freq_rare, "rare_words": n_rare}, whole_words=True)


def build_samples(task: str, tokenizer, ctx: int, *, depths: Sequence[float] = (0.1, 0.5, 0.9),
                  samples_per_depth: int = 1, essays: str | None = None, seed: int = 0,
                  prompt_format: str = "plain") -> list[Sample]:
    """Samples of a retrieval task at ``ctx`` tokens (prompt + answer), for each needle depth."""
    if task not in RETRIEVAL_TASKS:
        raise ValueError(f"Unknown retrieval task {task!r}; choose one of {', '.join(RETRIEVAL_TASKS)}.")
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"Needle depth {d} is outside [0, 1].")
    if samples_per_depth < 1:
        raise ValueError(f"samples_per_depth must be >= 1, got {samples_per_depth}.")
    frame = _Frame(tokenizer, prompt_format)
    rng = random.Random(f"{task}-{ctx}-{seed}")
    snapper = _SentenceSnapper(tokenizer)
    if needs_essays(task) and essays is None:
        from ..assets import load_essays
        essays = load_essays()
    haystack = _ids(tokenizer, essays) if task.startswith("niah") else None
    pool = _word_pool(essays) if task == "common_words" else None
    samples = []
    for depth in depths:
        for _ in range(samples_per_depth):
            if task == "passkey":
                samples.append(_passkey_sample(tokenizer, ctx, depth, rng, snapper, frame))
            elif task == "variable_tracking":
                samples.append(_variable_tracking_sample(tokenizer, ctx, depth, rng, snapper, frame))
            elif task == "common_words":
                samples.append(_common_words_sample(tokenizer, pool, ctx, depth, rng, frame))
            else:
                samples.append(_niah_sample(task, tokenizer, haystack, ctx, depth, rng, snapper, frame))
    return samples


def fidelity_windows(tokenizer, ctx: int, *, continuation: int = 32, windows: int = 1,
                     essays: str | None = None, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) pairs from the essays; context + continuation = ``ctx`` tokens.

    The continuation has ``continuation + 1`` tokens: its first token is fed after the dense
    prefill, and the policy's predictions of the next ``continuation`` tokens are scored.
    """
    if essays is None:
        from ..assets import load_essays
        essays = load_essays()
    ids = _ids(tokenizer, essays)
    n_ctx = ctx - continuation - 1
    if n_ctx < 16:
        raise ValueError(f"ctx={ctx} leaves no context before a {continuation}-token continuation.")
    if len(ids) < ctx:
        raise ValueError(f"The essays hold {len(ids)} tokens, fewer than ctx={ctx}.")
    rng = random.Random(f"fidelity-{ctx}-{seed}")
    out = []
    for _ in range(windows):
        start = rng.randint(0, len(ids) - ctx)
        out.append((ids[start:start + n_ctx], ids[start + n_ctx:start + ctx]))
    return out
