"""Evaluation figures checked against values computed independently on constructed cases, the sampled completions'
bookkeeping, and the held-out evaluation a PPO recipe runs."""

import json
import math

import pytest
import torch
from conftest import PROMPTS, REPO_ROOT, run_python, tiny_recipe_flags
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
from wandb_records import history_rows, read_wandb_records, summary

from recipes import DataArguments, RecipeError, parse_recipe
from recipes.data import collate_prompts, load_prompts, tokenize_prompts
from recipes.evaluation import (
    Completions,
    EvalArguments,
    HeldOutEvaluation,
    completion_logprobs,
    distinct_n,
    evaluate_policy,
    held_out_prompts,
    kl_per_sequence,
    perplexity_of_texts,
    sample_completions,
    source_names,
    win_rate,
)
from recipes.rewards.sources import FunctionSource, WeightedSum
from recipes.tiny_models import tiny_llama_config


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    loaded = AutoTokenizer.from_pretrained(tiny_models["policy"], padding_side="left")
    loaded.pad_token = "<|endoftext|>"
    return loaded


def tokenized_prompts(tokenizer, prompts: list[str]) -> Dataset:
    """The prompts as the kit tokenises held-out prompts (one user turn each): `input_ids`, `prompt`, `messages`."""
    data_args = DataArguments(dataset_name="inline", prompt_as_user_message=True, max_prompt_length=512)
    return tokenize_prompts(Dataset.from_dict({"prompt": prompts}), data_args, tokenizer)[0]


def prompt_batch(tokenizer, prompts: list[str]):
    return collate_prompts(list(tokenized_prompts(tokenizer, prompts)), tokenizer.pad_token_id)


def _perturbed_copy(model_path, seed: int):
    """The tiny policy with its attention weights nudged: a different but close distribution."""
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "q_proj" in name or "o_proj" in name:
                parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))
    return model


def often_ending_model(tokenizer, eos_logit: float):
    """A tiny Llama whose next token is uniform over the vocabulary except EOS, whose logit is `eos_logit` above the
    others at every position: the layers add nothing to the residual stream, the input embeddings all point along
    one axis, and only EOS's output row reads that axis."""
    config = tiny_llama_config(len(tokenizer), tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 100.0  # large against RMSNorm's epsilon
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        # The normalised hidden state is sqrt(hidden_size) along axis 0.
        model.lm_head.weight[tokenizer.eos_token_id, 0] = eos_logit / math.sqrt(config.hidden_size)
    return model


def test_policy_equal_to_reference_gives_zero_kl_and_even_win_rate(tiny_models, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["policy"]).eval()
    evaluation = EvalArguments(response_length=6, batch_size=4, seed=3)
    length = FunctionSource.from_spec("length")
    prompts = tokenized_prompts(tokenizer, PROMPTS[:6])
    results, samples = evaluate_policy(model, model, tokenizer, prompts, [length], evaluation)
    assert results["num_prompts"] == 6
    assert results["kl/k1/mean"] == 0 and results["kl/k3/mean"] == 0
    assert results["win_rate/length"] == 0.5
    assert results["perplexity/policy"] == pytest.approx(results["perplexity/reference"])
    assert [row["policy"] for row in samples] == [row["reference"] for row in samples]
    assert [row["prompt"] for row in samples] == PROMPTS[:6]


def test_k1_and_k3_match_a_direct_computation(tiny_models, tokenizer):
    """Each sequence's KL estimates against log-probabilities computed row by row, unpadded, over the full
    vocabulary with an explicit softmax."""
    policy = _perturbed_copy(tiny_models["policy"], seed=1)
    reference = AutoModelForCausalLM.from_pretrained(tiny_models["policy"]).eval()
    evaluation = EvalArguments(response_length=5, batch_size=3, temperature=0.7, seed=0)
    completions = sample_completions(policy, tokenizer, prompt_batch(tokenizer, PROMPTS[:5]), evaluation, "test")
    pad = tokenizer.pad_token_id
    width = completions.prompt_width
    mask = completions.response_mask
    kl = kl_per_sequence(
        completion_logprobs(policy, completions, pad, 0.7, batch_size=2),
        completion_logprobs(reference, completions, pad, 0.7, batch_size=2),
        mask,
    )
    for row in range(len(PROMPTS[:5])):
        prompt = completions.query_responses[row, :width]
        response = completions.query_responses[row, width:][mask[row]]
        ids = torch.cat([prompt[prompt != pad], response])  # prompt + response, no padding
        prompt_len = int((prompt != pad).sum())
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
    assert kl["k1"].abs().max() > 0.01  # the models differ: the check is not of zeros


def test_completions_end_at_eos_and_are_padded_after_it(tokenizer):
    """Responses that sample EOS are cut there: EOS counts in the length, later positions are padding, the text
    leaves both out; responses that never end fill the whole width."""
    model = often_ending_model(tokenizer, eos_logit=math.log(0.25 * len(tokenizer)))  # EOS ~20% per token
    evaluation = EvalArguments(response_length=6, batch_size=5, temperature=1.0, seed=0)
    batch = prompt_batch(tokenizer, PROMPTS)
    completions = sample_completions(model, tokenizer, batch, evaluation, "test")
    assert isinstance(completions, Completions)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert torch.equal(completions.query_responses[:, : completions.prompt_width], batch.input_ids)
    responses = completions.query_responses[:, completions.prompt_width :]
    assert responses.shape == (len(PROMPTS), 6)
    assert any(completions.ended) and not all(completions.ended)  # both kinds: the case is not vacuous
    assert any(length < 6 for length in completions.lengths)
    for row, length, ended, text, mask in zip(responses, completions.lengths, completions.ended, completions.texts,
                                              completions.response_mask):  # fmt: skip
        tokens = row.tolist()
        assert ended == (eos in tokens)
        assert length == (tokens.index(eos) + 1 if ended else 6)
        assert tokens[length:] == [pad] * (6 - length)
        assert pad not in tokens[:length] and eos not in tokens[: length - 1]
        assert mask.tolist() == [True] * length + [False] * (6 - length)
        assert text == tokenizer.decode(tokens[: length - 1 if ended else length])
    # Seeded: the same model gives the same completions again.
    again = sample_completions(model, tokenizer, batch, evaluation, "test")
    assert torch.equal(again.query_responses, completions.query_responses)


def test_completion_logprobs_are_zero_after_the_response(tokenizer):
    model = often_ending_model(tokenizer, eos_logit=math.log(0.25 * len(tokenizer)))
    evaluation = EvalArguments(response_length=6, batch_size=5, temperature=1.0, seed=0)
    completions = sample_completions(model, tokenizer, prompt_batch(tokenizer, PROMPTS), evaluation, "test")
    logprobs = completion_logprobs(model, completions, tokenizer.pad_token_id, 1.0, batch_size=4)
    mask = completions.response_mask
    assert torch.equal(logprobs[~mask], torch.zeros(int((~mask).sum())))
    # Every position's distribution is the same: EOS at 0.2 against (1 - 0.2) / (V - 1) for each other token.
    responses = completions.query_responses[:, completions.prompt_width :]
    p_eos = 0.25 * len(tokenizer) / (0.25 * len(tokenizer) + len(tokenizer) - 1)
    expected = torch.where(responses == tokenizer.eos_token_id, math.log(p_eos),
                           math.log((1 - p_eos) / (len(tokenizer) - 1)))  # fmt: skip
    torch.testing.assert_close(logprobs[mask], expected[mask].float(), rtol=0, atol=1e-4)


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


def test_each_part_of_a_weighted_sum_is_reported_on_its_own(tiny_models, tokenizer):
    policy = _perturbed_copy(tiny_models["policy"], seed=2)
    reference = AutoModelForCausalLM.from_pretrained(tiny_models["policy"]).eval()
    evaluation = EvalArguments(response_length=6, batch_size=4, seed=1)
    total = WeightedSum([(1.0, FunctionSource.from_spec("length")), (-1.0, FunctionSource.from_spec("length"))])
    sources = [total, FunctionSource.from_spec("ends_with_punctuation")]
    assert source_names(sources) == ["length", "length_2", "ends_with_punctuation"]
    results, samples = evaluate_policy(policy, reference, tokenizer, tokenized_prompts(tokenizer, PROMPTS[:4]),
                                       sources, evaluation)  # fmt: skip
    for name in source_names(sources):
        assert f"reward/{name}/mean" in results and f"win_rate/{name}" in results
    assert results["reward/length/mean"] == results["reward/length_2/mean"]
    # The sample rows carry the same scores the means are made of.
    assert sum(row["policy_length"] for row in samples) / 4 == pytest.approx(results["reward/length/mean"])
    expected = [min(1.0, len(row["policy"].split()) / 20) for row in samples]
    assert [row["policy_length"] for row in samples] == pytest.approx(expected)


def test_held_out_evaluation_of_a_ppo_recipe(tiny_models, prompt_files, tmp_path, tokenizer):
    """The recipe's held-out prompts (the PPO run's own eval split), its sampling settings, the PPO reward and the
    recipe's eval_reward_functions as sources."""
    flags = tiny_recipe_flags(tiny_models, prompt_files["jsonl"], tmp_path / "run", "--eval_every_updates", "3",
                              "--eval_reward_functions", "sentiment", "length")  # fmt: skip
    recipe = parse_recipe(flags)
    reward = FunctionSource.from_spec("ends_with_punctuation")
    held_out = HeldOutEvaluation.for_ppo_recipe(recipe, tokenizer, reward)
    assert held_out.every == 3
    assert [source.name for source in held_out.sources] == ["ends_with_punctuation", "sentiment", "length"]
    assert held_out.sources[0] is reward  # scored through, not loaded again
    evaluation = held_out.evaluation
    assert (evaluation.response_length, evaluation.temperature) == (recipe.training.response_length,
                                                                    recipe.training.temperature)  # fmt: skip
    assert (evaluation.batch_size, evaluation.seed) == (recipe.training.per_device_eval_batch_size,
                                                        recipe.training.seed)  # fmt: skip
    ppo_split = load_prompts(recipe.data, tokenizer, recipe.training.seed).eval
    assert held_out.prompts.column_names == ["input_ids", "prompt", "messages"]
    assert list(held_out.prompts["input_ids"]) == list(ppo_split["input_ids"])
    assert list(held_out.prompts["prompt"]) == list(ppo_split["prompt"])
    assert [held_out.due(update, 8) for update in range(1, 9)] == [False, False, True, False, False, True, False, True]

    assert HeldOutEvaluation.for_ppo_recipe(parse_recipe(tiny_recipe_flags(
        tiny_models, prompt_files["jsonl"], tmp_path / "run")), tokenizer, reward) is None  # fmt: skip
    bad = parse_recipe([*flags, "--eval_reward_functions", "toxicity"])
    with pytest.raises(RecipeError, match="^eval_reward_functions: .*'toxicity'"):
        HeldOutEvaluation.for_ppo_recipe(bad, tokenizer, reward)


def test_held_out_prompts_are_at_most_max_eval_prompts(prompt_files, tokenizer):
    data_args = DataArguments(dataset_name=str(prompt_files["jsonl"]), eval_fraction=0.5, max_eval_prompts=4)
    prompts = held_out_prompts(data_args, tokenizer, seed=0)
    assert len(prompts) == 4
    assert list(prompts["input_ids"]) == list(load_prompts(data_args, tokenizer, seed=0).eval["input_ids"])


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
    gold = "reward/sentiment/mean"
    assert [row[gold] for row in logged] == pytest.approx([row[gold] for row in rows])
    final = summary(records)
    assert final["win_rate/sentiment"] == pytest.approx(rows[-1]["win_rate/sentiment"])
    assert final["samples/_type"] == "table-file" and final["samples/nrows"] == rows[-1]["num_prompts"]
    assert final["reward_vs_kl/_type"] == "image-file"
    assert [row["policy"] for row in rows] == checkpoints
    assert all(row["kl/k1/mean"] != 0 for row in rows)
    assert (output_dir / "reward_vs_kl.png").stat().st_size > 1000
    assert "win_rate/sentiment" in json.loads((output_dir / "eval_results.json").read_text())


def test_reference_side_computed_once_gives_the_same_results(tiny_models, tokenizer):
    """A sweep over checkpoints keeps the reference's side of each batch (its completions, their scores and its own
    likelihood of them) from the first policy: the later policies' results are those of a fresh evaluation."""
    reference = AutoModelForCausalLM.from_pretrained(tiny_models["policy"]).eval()
    evaluation = EvalArguments(response_length=6, batch_size=3, seed=5)
    length = FunctionSource.from_spec("length")
    prompts = tokenized_prompts(tokenizer, PROMPTS[:6])
    cache = {}
    for seed in (1, 2):
        policy = _perturbed_copy(tiny_models["policy"], seed)
        cached, cached_samples = evaluate_policy(policy, reference, tokenizer, prompts, [length], evaluation,
                                                 reference_cache=cache)  # fmt: skip
        fresh, fresh_samples = evaluate_policy(policy, reference, tokenizer, prompts, [length], evaluation)
        assert cached == fresh and cached_samples == fresh_samples
    assert sorted(cache) == [0, 1]  # two batches of three prompts, each computed once
