"""Long-context tasks: passkey retrieval, RULER-style needles in the essays, and fidelity vs dense.

Every retrieval sample is built directly in token ids, so its length is exact: the prompt has
``ctx - max_new_tokens`` tokens and prompt plus answer fit in ``ctx``. Needles are inserted at a
requested depth (0 = start of the haystack, 1 = end), snapped to a sentence boundary.

* ``passkey``: a 5-digit key in repeated filler (Mohtashami & Jaggi, 2023).
* ``niah_single``: one "special magic number" needle in the essays (RULER's NIAH, Hsieh et al., 2024).
* ``niah_multikey``: the queried needle plus 3 distractor needles with other keys.
* ``niah_multivalue``: 4 needles with the same key and different values; all must be recalled.
* ``niah_multiquery``: 4 needles with different keys; all 4 are asked for.
* ``fidelity``: not a prompt task; see :func:`fidelity_windows` and ``evaluate.fidelity_metrics``.

A sample's score is the fraction of its expected answers found in the generated text (RULER's
string-match recall), so accuracy is in [0, 1].
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Sequence

__all__ = [
    "RETRIEVAL_TASKS",
    "TASKS",
    "Sample",
    "build_samples",
    "fidelity_windows",
    "score_text",
]

RETRIEVAL_TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery")
TASKS = RETRIEVAL_TASKS + ("fidelity",)

# Tokens each task may generate: enough for its answers, few enough to keep CPU runs short.
ANSWER_TOKENS = {
    "passkey": 8,
    "niah_single": 12,
    "niah_multikey": 12,
    "niah_multivalue": 40,
    "niah_multiquery": 40,
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
_PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is"

_NIAH_PREFIX = ("Some special magic numbers are hidden within the following text. Make sure to "
                "memorize it. I will quiz you about the numbers afterwards.\n\n")
_NIAH_NEEDLE = " One of the special magic numbers for {key} is: {value}. "
_NIAH_QUESTION_ONE = ("\n\nWhat is the special magic number for {key} mentioned in the provided text? "
                      "The special magic number for {key} mentioned in the provided text is")
_NIAH_QUESTION_ALL = ("\n\nWhat are all the special magic numbers for {key} mentioned in the provided "
                      "text? The special magic numbers for {key} mentioned in the provided text are")

_SENTENCE_END = re.compile(r"[.!?]\s*$")


@dataclass
class Sample:
    task: str
    prompt_ids: list[int]
    answers: list[str]  # strings expected in the generated text
    depth: float
    max_new_tokens: int
    meta: dict = field(default_factory=dict)


def score_text(answers: Sequence[str], text: str) -> float:
    """Fraction of ``answers`` present in ``text`` (RULER's string-match recall)."""
    if not answers:
        return 0.0
    return sum(a in text for a in answers) / len(answers)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


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


def _passkey_sample(tokenizer, ctx: int, depth: float, rng: random.Random, snapper) -> Sample:
    max_new = ANSWER_TOKENS["passkey"]
    key = str(rng.randint(10_000, 99_999))
    prefix = _bos(tokenizer) + _ids(tokenizer, _PASSKEY_PREFIX)
    needle = _ids(tokenizer, _PASSKEY_NEEDLE.format(key=key))
    question = _ids(tokenizer, _PASSKEY_QUESTION)
    budget = _filler_budget(ctx, max_new, prefix, needle, question)
    unit = _ids(tokenizer, _PASSKEY_FILLER)
    filler = unit * (budget // len(unit))  # whole sentences: the haystack ends cleanly before the question
    ids = _assemble(prefix, filler, [(depth, needle)], question, snapper)
    return Sample("passkey", ids, [key], depth, max_new, {"key": key})


def _niah_sample(task: str, tokenizer, haystack: list[int], ctx: int, depth: float,
                 rng: random.Random, snapper) -> Sample:
    max_new = ANSWER_TOKENS[task]
    n_needles = 1 if task == "niah_single" else 4
    keys = _keys(rng, n_needles)
    if task == "niah_multivalue":
        keys = [keys[0]] * n_needles
    values = [_magic_number(rng) for _ in range(n_needles)]
    needles_text = [_NIAH_NEEDLE.format(key=k, value=v) for k, v in zip(keys, values)]
    if task in ("niah_single", "niah_multikey"):
        question_text, answers = _NIAH_QUESTION_ONE.format(key=keys[0]), [values[0]]
    elif task == "niah_multivalue":
        question_text, answers = _NIAH_QUESTION_ALL.format(key=keys[0]), values
    else:  # niah_multiquery
        joined = ", ".join(keys[:-1]) + f" and {keys[-1]}"
        question_text, answers = _NIAH_QUESTION_ALL.format(key=joined), values
    prefix = _bos(tokenizer) + _ids(tokenizer, _NIAH_PREFIX)
    needles = [_ids(tokenizer, t) for t in needles_text]
    question = _ids(tokenizer, question_text)
    budget = _filler_budget(ctx, max_new, prefix, question, *needles)
    if len(haystack) < budget:
        raise ValueError(f"The essays hold {len(haystack)} tokens, fewer than the {budget} this ctx needs.")
    start = snapper.snap(haystack, rng.randint(0, len(haystack) - budget - 1))
    start = min(start, len(haystack) - budget)
    filler = haystack[start:start + budget]
    # The queried needle sits at the swept depth; the others at random depths.
    depths = [depth] + [rng.random() for _ in range(n_needles - 1)]
    ids = _assemble(prefix, filler, list(zip(depths, needles)), question, snapper)
    return Sample(task, ids, answers, depth, max_new, {"keys": keys, "values": values})


def build_samples(task: str, tokenizer, ctx: int, *, depths: Sequence[float] = (0.1, 0.5, 0.9),
                  samples_per_depth: int = 1, essays: str | None = None, seed: int = 0) -> list[Sample]:
    """Samples of a retrieval task at ``ctx`` tokens (prompt + answer), for each needle depth."""
    if task not in RETRIEVAL_TASKS:
        raise ValueError(f"Unknown retrieval task {task!r}; choose one of {', '.join(RETRIEVAL_TASKS)}.")
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"Needle depth {d} is outside [0, 1].")
    rng = random.Random(f"{task}-{ctx}-{seed}")
    snapper = _SentenceSnapper(tokenizer)
    haystack = None
    if task != "passkey":
        if essays is None:
            from .assets import load_essays
            essays = load_essays()
        haystack = _ids(tokenizer, essays)
    samples = []
    for depth in depths:
        for _ in range(samples_per_depth):
            if task == "passkey":
                samples.append(_passkey_sample(tokenizer, ctx, depth, rng, snapper))
            else:
                samples.append(_niah_sample(task, tokenizer, haystack, ctx, depth, rng, snapper))
    return samples


def fidelity_windows(tokenizer, ctx: int, *, continuation: int = 32, windows: int = 1,
                     essays: str | None = None, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) pairs from the essays; context + continuation = ``ctx`` tokens.

    The continuation has ``continuation + 1`` tokens: its first token is fed after the dense
    prefill, and the policy's predictions of the next ``continuation`` tokens are scored.
    """
    if essays is None:
        from .assets import load_essays
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
