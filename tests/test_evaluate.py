"""lm-evaluation-harness through the library: local tasks (YAML and jsonl written here) whose scores are also computed by hand."""

import json
import math

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install -e '.[eval]'")

from tests.conftest import check_exit, launch  # noqa: E402
from tests.naive_llama import naive_logits  # noqa: E402

MC_DOCS = [
    {"context": "Once upon a time, there was a little girl named", "choices": [" Lily", " Table", " Seven"], "label": 0},
    {"context": "Tom had a big red", "choices": [" ball", " sky", " the"], "label": 0},
    {"context": "The cat sat on the", "choices": [" mat", " bed", " ran"], "label": 2},
]
ROLLING_DOCS = [{"text": "Once upon a time, there was a little girl named Lily. She loved to play outside."},
                {"text": "Tom and his mom went to the park. They saw a big dog."}]
GEN_DOCS = [{"context": "Once upon a time", "target": ", there was a little girl named Lily"},
            {"context": "One day, a little bird", "target": " flew to the moon"}]

TASKS = {
    "stories_mc": ("multiple_choice", MC_DOCS, 'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\n'
                   'doc_to_target: label\ntarget_delimiter: ""\nmetric_list:\n  - metric: acc\n'),
    "stories_rolling": ("loglikelihood_rolling", ROLLING_DOCS, 'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
                        'metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n'),
    "stories_gen": ("generate_until", GEN_DOCS, 'doc_to_text: "{{context}}"\ndoc_to_target: "{{target}}"\n'
                    'target_delimiter: ""\ngeneration_kwargs:\n  until: ["."]\n  max_gen_toks: 30\n  do_sample: false\n'
                    'metric_list:\n  - metric: exact_match\n'),
}


@pytest.fixture(autouse=True)
def offline_datasets(monkeypatch, tmp_path_factory):
    """The local tasks' jsonl load through datasets' json builder: no hub, and a cache of their own."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "datasets"))


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    for name, (output_type, docs, rest) in TASKS.items():
        (d / f"{name}.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
        (d / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {d / name}.jsonl\n"
            f"test_split: test\noutput_type: {output_type}\n{rest}")
    return d


@pytest.fixture(scope="module")
def reference(stories260k):
    from llama.tokenizer import Tokenizer

    sd = torch.load(stories260k / "consolidated.00.pth", weights_only=True)
    params = json.loads((stories260k / "params.json").read_text())
    return Tokenizer(str(stories260k / "tokenizer.model")), sd, params


def logprob(reference, context_tokens, continuation_tokens) -> float:
    """log P(continuation | context) from the float64 formula."""
    _, sd, params = reference
    tokens = context_tokens + continuation_tokens
    logp = torch.log_softmax(naive_logits(sd, params, tokens), dim=-1)
    n = len(context_tokens)
    return sum(logp[n - 1 + k, t].item() for k, t in enumerate(continuation_tokens))


def test_scores_equal_a_hand_computation(task_dir, reference, tmp_path):
    from llama.evaluate import main

    results = main("stories_mc,stories_rolling,stories_gen", max_seq_len=128, max_batch_size=4, device="cpu",
                   include_path=str(task_dir), output=str(tmp_path / "out.json"))
    tokenizer = reference[0]

    # Multiple choice: the choice with the highest log-probability after the context.
    correct = []
    for doc in MC_DOCS:
        context = tokenizer.encode(doc["context"], bos=True, eos=False)
        scores = [logprob(reference, context, tokenizer.encode(doc["context"] + c, bos=True, eos=False)[len(context):])
                  for c in doc["choices"]]
        correct.append(max(range(3), key=scores.__getitem__) == doc["label"])
    assert 0 < sum(correct) < 3  # the third doc's label is deliberately not the model's choice
    assert results["stories_mc"]["acc,none"] == pytest.approx(sum(correct) / 3)

    # Rolling log-likelihood: every token after BOS (the texts fit in one window).
    total_ll, words, nbytes = 0.0, 0, 0
    for doc in ROLLING_DOCS:
        tokens = tokenizer.encode(doc["text"], bos=True, eos=False)
        total_ll += logprob(reference, tokens[:1], tokens[1:])
        words += len(doc["text"].split())
        nbytes += len(doc["text"].encode("utf-8"))
    assert results["stories_rolling"]["word_perplexity,none"] == pytest.approx(math.exp(-total_ll / words), rel=1e-4)
    assert results["stories_rolling"]["bits_per_byte,none"] == pytest.approx(-total_ll / nbytes / math.log(2), rel=1e-4)

    # Generation until ".": greedy text compared with the target.
    from llama import Llama, demo_model_dir

    llama = Llama.build(str(demo_model_dir()), str(demo_model_dir() / "tokenizer.model"), 128, 2, device="cpu")
    texts = [llama.text_completion([d["context"]], temperature=0, max_gen_len=30, stop=["."])[0]["generation"] for d in GEN_DOCS]
    matches = [t == d["target"] for t, d in zip(texts, GEN_DOCS)]
    assert matches == [True, False]
    assert results["stories_gen"]["exact_match,none"] == pytest.approx(0.5)
    assert json.loads((tmp_path / "out.json").read_text())["results"]["stories_mc"]["acc,none"] == results["stories_mc"]["acc,none"]


def test_cli_under_torchrun_reports_once(task_dir, tmp_path):
    out = tmp_path / "out.json"
    proc = launch(["-m", "llama.evaluate", "--tasks", "stories_mc", "--include_path", task_dir, "--device", "cpu",
                   "--max_seq_len", "128", "--output", out], nproc=2)
    check_exit(proc)
    assert proc.stdout.count("stories_mc") == 1 and "acc" in proc.stdout
    assert "acc,none" in json.loads(out.read_text())["results"]["stories_mc"]


def test_an_unknown_task_is_named_with_the_closest_ones():
    from llama.evaluate import check_task_names

    check_task_names(["stories_mc"], ["stories_mc", "stories_gen"])  # known: nothing to say
    with pytest.raises(ValueError, match=r"unknown lm-eval task 'stories_m' \(closest: stories_mc\).*lm-eval ls tasks"):
        check_task_names(["stories_mc", "stories_m"], ["stories_mc", "hellaswag"])


def test_cli_refuses_an_unknown_task_before_the_model_loads(task_dir):
    proc = launch(["-m", "llama.evaluate", "--tasks", "stories_mcq", "--include_path", task_dir, "--device", "cpu"])
    assert proc.returncode == 2 and "unknown lm-eval task 'stories_mcq' (closest: stories_mc" in proc.stderr
    assert "Traceback" not in proc.stderr and "Loaded" not in proc.stdout + proc.stderr
