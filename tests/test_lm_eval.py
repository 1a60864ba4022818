"""``python -m repo_mlx.lm_eval`` on local lm-eval tasks, checked against the model's own log-likelihoods."""

import json
import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import pytest

import repo_mlx

pytest.importorskip("lm_eval", reason="needs the eval extra: pip install 'repo-mlx[eval]'")

CHOICE_ITEMS = [
    ("The sky is", ["blue", "green", "loud"]),
    ("Two plus two is", ["four", "five"]),
    ("Cats say", ["meow", "moo", "woof"]),
]
GEN_PROMPTS = ["Hello", "Once upon a time"]
MAX_GEN = 8
BLENDS = (0.0, 1.0)


def run(*args, env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "repo_mlx.lm_eval", *args], capture_output=True, text=True, env=env)


def loglikelihood(model, tokenizer, context, continuation):
    """log p(continuation | context) from one full forward pass, no cache."""
    n = len(tokenizer.encode(context))
    full = tokenizer.encode(context + continuation)
    logprobs = nn.log_softmax(model(mx.array(full)[None])[0].astype(mx.float32))
    return sum(logprobs[t - 1, full[t]].item() for t in range(n, len(full)))


def greedy_text(model, tokenizer, prompt):
    """Greedy continuation by full forward passes, cut at the first newline."""
    tokens, out = tokenizer.encode(prompt), []
    for _ in range(MAX_GEN):
        token = mx.argmax(model(mx.array(tokens + out)[None])[0, -1]).item()
        if token in tokenizer.eos_token_ids:
            break
        out.append(token)
    return tokenizer.decode(out).split("\n")[0]


def write_tasks(folder, labels, answers):
    data = folder / "data"
    data.mkdir(parents=True)
    mc = [{"question": q, "choices": c, "label": label} for (q, c), label in zip(CHOICE_ITEMS, labels)]
    gen = [{"question": q, "answer": a} for q, a in zip(GEN_PROMPTS, answers)]
    (data / "mc.jsonl").write_text("\n".join(map(json.dumps, mc)))
    (data / "gen.jsonl").write_text("\n".join(map(json.dumps, gen)))
    common = "dataset_path: json\ntest_split: test\ndataset_kwargs:\n  data_files:\n    test: {}\n"
    metric = "metric_list:\n  - metric: {}\n    aggregation: mean\n    higher_is_better: true\n"
    (folder / "mc.yaml").write_text(
        "task: tiny_mc\n" + common.format(data / "mc.jsonl") + "output_type: multiple_choice\n"
        "doc_to_text: question\ndoc_to_choice: choices\ndoc_to_target: label\n" + metric.format("acc")
    )
    (folder / "gen.yaml").write_text(
        "task: tiny_gen\n" + common.format(data / "gen.jsonl") + "output_type: generate_until\n"
        "doc_to_text: question\ndoc_to_target: answer\n"
        f"generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: {MAX_GEN}\n  do_sample: false\n"
        + metric.format("exact_match")
    )


def test_local_tasks_match_the_models_own_loglikelihoods(fixture_path, tmp_path):
    model, tokenizer = repo_mlx.load(str(fixture_path))  # float32
    lls, texts = {}, {}
    for blend in BLENDS:
        repo_mlx.set_position_blend(model, blend)
        lls[blend] = [[loglikelihood(model, tokenizer, q, " " + c) for c in cs] for q, cs in CHOICE_ITEMS]
        texts[blend] = [greedy_text(model, tokenizer, q) for q in GEN_PROMPTS]
    best = [max(range(len(ll)), key=ll.__getitem__) for ll in lls[0.0]]
    # Gold answers the RePo model gets right for all items but the last, so accuracy is not 0 or 1.
    labels = best[:-1] + [(best[-1] + 1) % len(CHOICE_ITEMS[-1][1])]
    assert texts[0.0][0], "the first prompt's greedy answer should not be empty"
    answers = [texts[0.0][0], "not what the model says"]
    write_tasks(tmp_path / "tasks", labels, answers)

    out = tmp_path / "out"
    r = run("--model", str(fixture_path), "--tasks", "tiny_mc,tiny_gen", "--include-path", str(tmp_path / "tasks"),
            "--position-blend", "0,1", "--output-dir", str(out), "--log-samples",
            env={"HF_DATASETS_CACHE": str(tmp_path / "datasets")})
    assert r.returncode == 0, r.stderr
    assert "| tiny_mc | acc | " in r.stdout and "| RePo (blend 0) | RoPE (blend 1) |" in r.stdout
    (report,) = [json.loads(p.read_text()) for p in out.glob("*.json")]
    for blend in BLENDS:
        results, samples = report["results"][str(blend)], report["samples"][str(blend)]
        for s in samples["tiny_mc"]:
            got = [resp[0] for resp in s["filtered_resps"]]
            assert got == pytest.approx(lls[blend][s["doc_id"]], abs=1e-4)
        expected_acc = sum(
            max(range(len(ll)), key=ll.__getitem__) == label for ll, label in zip(lls[blend], labels)
        ) / len(labels)
        assert results["tiny_mc"]["acc,none"] == pytest.approx(expected_acc)
        assert [s["filtered_resps"][0] for s in sorted(samples["tiny_gen"], key=lambda s: s["doc_id"])] == texts[blend]
        expected_match = sum(t == a for t, a in zip(texts[blend], answers)) / len(answers)
        assert results["tiny_gen"]["exact_match,none"] == pytest.approx(expected_match)
    assert report["results"]["0.0"]["tiny_mc"]["acc,none"] == pytest.approx(2 / 3)
    assert report["results"]["0.0"]["tiny_gen"]["exact_match,none"] == pytest.approx(1 / 2)
    assert lls[0.0] != lls[1.0]  # the two blends are different models


@pytest.mark.parametrize(
    "task, message",
    [
        ("no_such_task", "error: Unknown task 'no_such_task': not an lm-eval task, group or tag"),
        ("arc_easy", "error: Cannot load the data of task 'arc_easy' ("),
    ],
)
def test_unknown_and_unreachable_tasks_are_one_line_errors(fixture_path, tmp_path, task, message):
    r = run("--model", str(fixture_path), "--tasks", task, env={"HF_DATASETS_CACHE": str(tmp_path)})
    assert r.returncode == 2 and r.stderr.startswith(message) and r.stderr.count("\n") == 1, r.stderr
    if task == "arc_easy":
        assert "Hugging Face Hub" in r.stderr and "--include-path" in r.stderr


def test_without_lm_eval_says_how_to_install(fixture_path):
    code = "import sys; sys.modules['lm_eval'] = None\nfrom repo_mlx import _cli, lm_eval\nlm_eval.main()"
    r = subprocess.run([sys.executable, "-c", code, "--model", str(fixture_path), "--tasks", "arc_easy"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr == 'error: lm-evaluation-harness is not installed: pip install "repo-mlx[eval]" (or pip install lm-eval).\n'
