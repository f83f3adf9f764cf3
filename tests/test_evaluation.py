"""Evaluation figures checked against values computed independently on constructed cases."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from recipes.evaluation import (
    EvalArguments,
    distinct_n,
    evaluate_policy,
    kl_per_sequence,
    perplexity_of_texts,
    response_logprobs,
    sample_completions,
    win_rate,
)
from recipes.tiny_models import tiny_llama_config
from reward_models.sources import FunctionSource
from tests.conftest import PROMPTS, REPO_ROOT, run_python
from tests.wandb_records import history_rows, read_wandb_records, summary


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    loaded = AutoTokenizer.from_pretrained(tiny_models["policy"], padding_side="left")
    loaded.pad_token = "<|endoftext|>"
    return loaded


def _perturbed_copy(model_path, seed: int):
    """The tiny policy with its attention weights nudged: a different but close distribution."""
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "q_proj" in name or "o_proj" in name:
                parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))
    return model


def test_policy_equal_to_reference_gives_zero_kl_and_even_win_rate(tiny_models, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["policy"]).eval()
    evaluation = EvalArguments(response_length=6, batch_size=4, seed=3)
    length = FunctionSource.from_spec("length")
    results, samples = evaluate_policy(model, model, tokenizer, PROMPTS[:6], PROMPTS[:6], True, [length], evaluation)
    assert results["kl/k1/mean"] == 0 and results["kl/k3/mean"] == 0
    assert results["win_rate/length"] == 0.5
    assert results["perplexity/policy"] == pytest.approx(results["perplexity/reference"])
    assert [row["policy"] for row in samples] == [row["reference"] for row in samples]


def test_k1_and_k3_match_a_direct_computation(tiny_models, tokenizer):
    """Each sequence's KL estimates against log-probabilities computed row by row, unpadded, over the full
    vocabulary with an explicit softmax."""
    policy = _perturbed_copy(tiny_models["policy"], seed=1)
    reference = AutoModelForCausalLM.from_pretrained(tiny_models["policy"]).eval()
    evaluation = EvalArguments(response_length=5, batch_size=3, temperature=0.7, seed=0)
    completions = sample_completions(policy, tokenizer, PROMPTS[:5], evaluation, True, "test")
    width = completions.prompt_width
    mask = completions.attention_mask[:, width:]
    kl = kl_per_sequence(
        response_logprobs(policy, completions, 0.7, batch_size=2),
        response_logprobs(reference, completions, 0.7, batch_size=2),
        mask,
    )
    for row in range(len(PROMPTS[:5])):
        ids = completions.input_ids[row][completions.attention_mask[row].bool()]  # prompt + response, no padding
        prompt_len = int(completions.attention_mask[row, :width].sum())
        with torch.no_grad():
            p_logits = policy(ids[None]).logits[0].double() / 0.7
            q_logits = reference(ids[None]).logits[0].double() / 0.7
        k1, k3 = 0.0, 0.0
        for position in range(prompt_len, len(ids)):
            token = ids[position]
            log_p = p_logits[position - 1].exp().div(p_logits[position - 1].exp().sum()).log()[token]
            log_q = q_logits[position - 1].exp().div(q_logits[position - 1].exp().sum()).log()[token]
            k1 += (log_p - log_q).item()
            ratio = math.exp((log_q - log_p).item())
            k3 += ratio - 1 - math.log(ratio)
        assert kl["k1"][row].item() == pytest.approx(k1, abs=2e-3)
        assert kl["k3"][row].item() == pytest.approx(k3, abs=2e-3)
    assert kl["k3"].min() >= 0


def test_perplexity_of_a_uniform_model_is_its_vocabulary_size(tokenizer, tmp_path):
    """A model whose output layer is zero predicts the uniform distribution: perplexity = vocabulary size."""
    config = tiny_llama_config(len(tokenizer), tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    assert perplexity_of_texts(model, tokenizer, PROMPTS[:4], batch_size=3) == pytest.approx(len(tokenizer), rel=1e-4)


def test_win_rate_counts_ties_half_and_distinct_n():
    assert win_rate(torch.tensor([1.0, 0.0, 2.0, 5.0]), torch.tensor([0.0, 0.0, 3.0, 1.0])) == pytest.approx(0.625)
    assert distinct_n(["a b a b", "a c"], 1) == pytest.approx(3 / 6)
    assert distinct_n(["a b a b", "a c"], 2) == pytest.approx(3 / 4)  # (a b), (b a), (a b), (a c)


@pytest.mark.slow
def test_checkpoint_sweep_writes_one_row_per_checkpoint_and_a_plot(tiny_models, prompt_files, tmp_path):
    """Also to W&B (offline): one history row per checkpoint with the same figures, the last as the summary, the
    sample table and the reward-vs-KL image."""
    checkpoints = []
    for seed in (1, 2):
        folder = tmp_path / f"checkpoint-{seed}"
        _perturbed_copy(tiny_models["policy"], seed).save_pretrained(folder)
        checkpoints.append(str(folder))
    output_dir = tmp_path / "eval"
    result = run_python(
        [
            "scripts/evaluate.py", "--config", "configs/tiny/eval.yaml",
            "--checkpoints", *checkpoints,
            "--reference_name_or_path", str(tiny_models["policy"]),
            "--reward_models", str(tiny_models["reward"]),
            "--dataset_name", str(prompt_files["jsonl"]),
            "--output_dir", str(output_dir),
            "--report_to", "wandb",
        ],
        cwd=REPO_ROOT,
        env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in (output_dir / "sweep.jsonl").read_text().splitlines()]
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    records = read_wandb_records(run_file)
    logged = [row for row in history_rows(records) if "kl/k1/mean" in row]
    assert [row["kl/k1/mean"] for row in logged] == pytest.approx([row["kl/k1/mean"] for row in rows], rel=1e-9)
    assert [row["reward/sentiment/mean"] for row in logged] == pytest.approx([row["reward/sentiment/mean"] for row in rows])
    final = summary(records)
    assert final["win_rate/sentiment"] == pytest.approx(rows[-1]["win_rate/sentiment"])
    assert final["samples/_type"] == "table-file" and final["samples/nrows"] == rows[-1]["num_prompts"]
    assert final["reward_vs_kl/_type"] == "image-file"
    assert [row["policy"] for row in rows] == checkpoints
    assert all(row["kl/k1/mean"] != 0 for row in rows)
    assert (output_dir / "reward_vs_kl.png").stat().st_size > 1000
    assert "win_rate/sentiment" in json.loads((output_dir / "eval_results.json").read_text())


