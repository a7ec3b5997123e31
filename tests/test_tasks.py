"""Task construction (exact lengths, needle depth, answers), scoring and the eval reporting."""

import json
import math
import re

import pytest
import torch

from composable_kv.eval import evaluate, tasks

pytestmark = pytest.mark.cpu


class WordTokenizer:
    """Deterministic word/punctuation tokenizer: enough to build and read back prompts offline."""

    _split = re.compile(r"\s+|\w+|[^\w\s]")

    def __init__(self):
        self.vocab, self.words = {}, []

    def _id(self, piece):
        if piece not in self.vocab:
            self.vocab[piece] = len(self.words)
            self.words.append(piece)
        return self.vocab[piece]

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [self._id(p) for p in self._split.findall(text)]}

    def decode(self, ids, **_):
        return "".join(self.words[i] for i in ids)


ESSAYS = " ".join(f"Essay sentence number {i} talks about startups and hackers." for i in range(3000))
WORDS = " ".join("".join(chr(97 + (i // 26 ** k) % 26) for k in range(4)) + "qz" for i in range(3000))
ESSAYS += " " + WORDS  # distinct words for common_words


@pytest.fixture
def tok():
    return WordTokenizer()


@pytest.mark.parametrize("task", tasks.RETRIEVAL_TASKS)
@pytest.mark.parametrize("ctx", [512, 2048])
def test_samples_fit_ctx_and_hold_their_answers(tok, task, ctx):
    samples = tasks.build_samples(task, tok, ctx, depths=(0.0, 0.5, 1.0), essays=ESSAYS)
    assert len(samples) == 3
    for s in samples:
        assert len(s.prompt_ids) + s.max_new_tokens <= ctx
        assert len(s.prompt_ids) + s.max_new_tokens >= ctx - 40  # the haystack fills the context
        text = tok.decode(s.prompt_ids)
        for answer in s.answers:
            assert answer in text
        assert text.rstrip().endswith(("is", "are", "are:"))  # ends with the answer prefix
    expected_answers = {"passkey": 1, "niah_single": 1, "niah_multikey": 1, "niah_multivalue": 4,
                        "niah_multiquery": 4, "variable_tracking": 5, "common_words": 10}[task]
    assert all(len(s.answers) == expected_answers for s in samples)


def test_needle_depth_is_respected(tok):
    positions = []
    for depth in (0.1, 0.5, 0.9):
        s = tasks.build_samples("passkey", tok, 2048, depths=(depth,))[0]
        text = tok.decode(s.prompt_ids)
        positions.append(text.index(f"pass key is {s.answers[0]}") / len(text))
    assert positions == sorted(positions)
    for got, want in zip(positions, (0.1, 0.5, 0.9)):
        assert abs(got - want) < 0.05


def test_samples_are_deterministic_per_seed(tok):
    a = tasks.build_samples("niah_multikey", tok, 1024, essays=ESSAYS, seed=3)
    b = tasks.build_samples("niah_multikey", tok, 1024, essays=ESSAYS, seed=3)
    c = tasks.build_samples("niah_multikey", tok, 1024, essays=ESSAYS, seed=4)
    assert [s.prompt_ids for s in a] == [s.prompt_ids for s in b]
    assert [s.answers for s in a] != [s.answers for s in c]


def test_multikey_has_distractors_and_multiquery_asks_all(tok):
    mk = tasks.build_samples("niah_multikey", tok, 1024, depths=(0.5,), essays=ESSAYS)[0]
    text = tok.decode(mk.prompt_ids)
    assert text.count("special magic numbers for") == 4 and len(mk.answers) == 1
    mq = tasks.build_samples("niah_multiquery", tok, 1024, depths=(0.5,), essays=ESSAYS)[0]
    question = tok.decode(mq.prompt_ids).rsplit("\n\n", 1)[1]
    assert all(k in question for k in mq.meta["keys"])


def test_bad_task_inputs_are_clear_errors(tok):
    with pytest.raises(ValueError, match="Unknown retrieval task"):
        tasks.build_samples("nope", tok, 1024)
    with pytest.raises(ValueError, match="outside"):
        tasks.build_samples("passkey", tok, 1024, depths=(1.5,))
    with pytest.raises(ValueError, match="too short"):
        tasks.build_samples("passkey", tok, 40)


def test_score_text():
    assert tasks.score_text(["12345"], " 12345. Remember") == 1.0
    assert tasks.score_text(["1", "2", "3", "4"], "1 and 3") == 0.5
    assert tasks.score_text(["99"], "nothing") == 0.0
    assert tasks.score_text(["able"], "capable", whole_words=False) == 1.0
    assert tasks.score_text(["able", "river"], "capable, River.", whole_words=True) == 0.5


def test_variable_tracking_chain_reads_in_order(tok):
    for depth in (0.1, 0.5, 0.9):
        s = tasks.build_samples("variable_tracking", tok, 2048, depths=(depth,), seed=1)[0]
        text = tok.decode(s.prompt_ids)
        value = s.meta["value"]
        first = text.index(f"VAR {s.answers[0]} = {value}.")
        hops = [text.index(f"VAR {b} = VAR {a}.") for a, b in zip(s.answers, s.answers[1:])]
        assert [first, *hops] == sorted([first, *hops])  # each hop after the one it copies
        after_hops = sum(len(f" VAR {b} = VAR {a}. ") for a, b in zip(s.answers, s.answers[1:]))
        assert abs(first / (len(text) - after_hops) - depth) < 0.05  # depth in the text without the hops
        assert len(set(s.answers)) == 5 and text.count(value) == 3  # the assignment, the question, the answer prefix


def test_common_words_counts(tok):
    for ctx in (512, 4096):
        s = tasks.build_samples("common_words", tok, ctx, depths=(0.5,), essays=ESSAYS)[0]
        text = tok.decode(s.prompt_ids)
        listed = re.findall(r"(\d+)\. ([a-z]+)\n", text)
        assert [int(n) for n, _ in listed] == list(range(1, len(listed) + 1))
        counts = {}
        for _, w in listed:
            counts[w] = counts.get(w, 0) + 1
        fc, fr = s.meta["freq_common"], s.meta["freq_rare"]
        assert fc > fr and all(counts[w] == fc for w in s.answers)
        assert sorted(counts.values()).count(fr) == len(counts) - 10 and s.meta["rare_words"] > 0
        assert s.whole_words and tasks.score_sample(s, " ".join(s.answers).upper()) == 1.0
    assert fc == tasks.CWE_FREQ_COMMON and fr == tasks.CWE_FREQ_RARE  # 4096 tokens hold the full frequencies


class ChatWordTokenizer(WordTokenizer):
    chat_template = "user/assistant"

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        assert add_generation_prompt and not tokenize and len(messages) == 1
        return f"<user> {messages[0]['content']} <end> <assistant> "


@pytest.mark.parametrize("task", tasks.RETRIEVAL_TASKS)
def test_chat_format_wraps_the_task(task):
    chat, plain = ChatWordTokenizer(), WordTokenizer()
    s = tasks.build_samples(task, chat, 1024, depths=(0.5,), essays=ESSAYS, prompt_format="chat")[0]
    p = tasks.build_samples(task, plain, 1024, depths=(0.5,), essays=ESSAYS)[0]
    text = chat.decode(s.prompt_ids)
    assert text.startswith("<user> ") and text.count("<assistant>") == 1
    question, reply = text.split(" <end> <assistant> ")
    assert reply.startswith(("The", "Answer:")) and "?" in question.rsplit("\n", 1)[-1]
    assert len(s.prompt_ids) + s.max_new_tokens <= 1024 and s.answers == p.answers
    assert "<user>" not in plain.decode(p.prompt_ids)


def test_plain_niah_prompt_keeps_its_text(tok):
    s = tasks.build_samples("niah_single", tok, 1024, depths=(0.5,), essays=ESSAYS)[0]
    key = s.meta["keys"][0]
    assert tok.decode(s.prompt_ids).endswith(
        f"What is the special magic number for {key} mentioned in the provided text? "
        f"The special magic number for {key} mentioned in the provided text is")


def test_chat_format_needs_a_template(tok):
    with pytest.raises(ValueError, match="no chat template.*--prompt-format plain"):
        tasks.build_samples("passkey", tok, 1024, prompt_format="chat")
    with pytest.raises(ValueError, match="Unknown prompt format"):
        tasks.build_samples("passkey", tok, 1024, prompt_format="markdown")


def test_fidelity_windows(tok):
    windows = tasks.fidelity_windows(tok, 1024, continuation=16, windows=2, essays=ESSAYS)
    assert len(windows) == 2
    for context, continuation in windows:
        assert len(context) + len(continuation) == 1024 and len(continuation) == 17


def test_fidelity_metrics():
    torch.manual_seed(0)
    logits = torch.randn(5, 11)
    targets = logits.argmax(-1)
    same = evaluate.fidelity_metrics(logits, logits, targets)
    assert same["kl_sum"] == pytest.approx(0.0, abs=1e-6) and same["agree_sum"] == 5
    assert same["nll_sum"] == pytest.approx(same["nll_dense_sum"])
    other = evaluate.fidelity_metrics(torch.randn(5, 11), logits, targets)
    assert other["kl_sum"] > 0 and other["nll_sum"] > same["nll_sum"]


def test_results_are_written(tmp_path):
    rows = [
        evaluate.EvalRow("dense", "passkey", 2048, 3, accuracy=1.0, kv_bytes_per_token=2e6,
                         kv_read_fraction=1.0, pages_per_token=100),
        evaluate.EvalRow("quest", "fidelity", 2048, 1, kl_vs_dense=0.01, top1_agreement=0.9, ppl=10.0,
                         ppl_dense=9.5, kv_bytes_per_token=1e6, kv_read_fraction=0.5, pages_per_token=50),
    ]
    res = evaluate.write_results(rows, tmp_path, {"command": "ckv eval ...", "device": "cpu"}, stem="r")
    assert "| dense | passkey | 2048 |" in res["table"] and "50.0" in res["table"]
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["rows"][1]["kl_vs_dense"] == 0.01 and data["meta"]["device"] == "cpu"
    assert (tmp_path / "r.md").read_text().count("\n|") >= 3
    try:
        import matplotlib  # noqa: F401
        assert res["png"] is not None and res["png"].stat().st_size > 0
    except ImportError:
        assert "matplotlib is not installed" in res["note"]
    assert not math.isnan(rows[0].kv_bytes_per_token)


def test_eval_cli_rejects_a_bad_policy_before_loading_a_model(capsys):
    from composable_kv import cli
    assert cli.main(["eval", "--policy", "configs/no_such.yaml", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no_such.yaml" in err and "not found" in err


def test_eval_cli_rejects_a_bad_model_path(capsys, tmp_path):
    from composable_kv import cli
    code = cli.main(["eval", "--policy", "configs/dense.yaml", "--model", str(tmp_path / "nope"),
                          "--quiet", "--device", "cpu", "--out", str(tmp_path / "out")])
    assert code == 2 and "no such file or folder" in capsys.readouterr().err
