"""Reward models: the preference builder on the tiny random policy, and pairwise training on a synthetic set whose
chosen side always holds one particular word, which a 2-layer random Llama classifier must learn to find."""

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaForCausalLM

from recipes.config import ModelArguments
from recipes.errors import RecipeError
from recipes.model_cache import resolve_model_path
from recipes.models import load_tokenizer
from recipes.tiny_models import DEFAULT_TOKENIZER, tiny_llama_config
from reward_models.config import parse_reward_recipe
from recipes.rewards.sources import FunctionSource
from reward_models.preferences import build_preferences, preference_rows
from recipes.rewards.sources import scored_token_ids, sequence_scores
from reward_models.training import train_reward_model

from conftest import REPO_ROOT, read_metrics, run_python

TINY_REWARD_RECIPE = REPO_ROOT / "configs" / "tiny" / "reward.yaml"
MARKER = "marvellous"
FILLER = (
    "the a blue table river walk seven paper window quiet green road chair early stone cloud music garden letter "
    "bread clock yellow train morning door lamp street orange"
).split()
PROMPTS = ["Describe your day.", "Write a note to a friend.", "Review the cafe.", "Tell a short story."]


def marker_pairs(count: int, seed: int) -> list[dict]:
    """Pairs of filler sentences that differ in one word: `MARKER` in the chosen one, a filler word in the
    rejected one, at the same place."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        words = rng.sample(FILLER, rng.randint(4, 8))
        place = rng.randint(0, len(words))
        user = {"role": "user", "content": rng.choice(PROMPTS)}
        chosen = " ".join(words[:place] + [MARKER] + words[place:])
        rejected = " ".join(words[:place] + [rng.choice(FILLER)] + words[place:])
        rows.append(
            {
                "chosen": [user, {"role": "assistant", "content": chosen}],
                "rejected": [user, {"role": "assistant", "content": rejected}],
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture(scope="module")
def random_llama(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer Llama (hidden size 64) causal LM with SmolLM2's tokenizer: the reward model
    gets a new score head on top of it."""
    folder = tmp_path_factory.mktemp("random_llama")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(DEFAULT_TOKENIZER))
    torch.manual_seed(0)
    config = tiny_llama_config(len(tokenizer), hidden_size=64, num_hidden_layers=2, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def marker_dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("marker_pairs")
    write_jsonl(folder / "train.jsonl", marker_pairs(128, seed=0))
    write_jsonl(folder / "test.jsonl", marker_pairs(48, seed=1))
    return folder


def reward_flags(model: Path, dataset: Path, output_dir: Path, *overrides: str) -> list[str]:
    return [
        "--config", str(TINY_REWARD_RECIPE),
        "--model_name_or_path", str(model),
        "--dataset_name", str(dataset),
        "--output_dir", str(output_dir),
        *overrides,
    ]  # fmt: skip


def test_reward_model_learns_the_marker_and_reloads_with_the_same_scores(random_llama, marker_dataset, tmp_path):
    output_dir = tmp_path / "reward_model"
    recipe = parse_reward_recipe(
        reward_flags(
            random_llama, marker_dataset, output_dir,
            "--num_train_epochs", "3", "--per_device_train_batch_size", "16", "--learning_rate", "3e-3",
            "--normalize_rewards", "true",
        )
    )  # fmt: skip
    result = train_reward_model(recipe)

    assert result.final_metrics["final/eval/accuracy"] >= 0.9
    assert result.final_metrics["final/eval/margin"] > 0
    assert result.final_metrics["centring/reference_std_score_before"] != pytest.approx(1.0, abs=0.05)

    reloaded = AutoModelForSequenceClassification.from_pretrained(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    kit_pad_id = load_tokenizer(ModelArguments(model_name_or_path=str(random_llama))).pad_token_id
    assert reloaded.config.num_labels == 1
    assert reloaded.config.pad_token_id == kit_pad_id == tokenizer.pad_token_id
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.chat_template

    # normalize_rewards: over the training pairs' completions (the default reference), mean 0 and std 1.
    training_rows = marker_pairs(128, seed=0)
    completions = [row[side] for side in ("chosen", "rejected") for row in training_rows]
    reference = {tuple(scored_token_ids(tokenizer, conversation)) for conversation in completions}
    reference_scores = sequence_scores(reloaded, [list(ids) for ids in reference], tokenizer.pad_token_id)
    assert reference_scores.mean().item() == pytest.approx(0.0, abs=1e-3)
    assert reference_scores.std().item() == pytest.approx(1.0, abs=1e-3)

    texts = [row["chosen"] for row in marker_pairs(6, seed=2)] + [row["rejected"] for row in marker_pairs(6, seed=2)]
    sequences = [scored_token_ids(tokenizer, conversation) for conversation in texts]
    torch.testing.assert_close(sequence_scores(reloaded, sequences, tokenizer.pad_token_id), sequence_scores(result.model, sequences, tokenizer.pad_token_id))

    metrics = read_metrics(output_dir / "metrics.jsonl")
    assert any("eval_accuracy" in line and "eval_margin" in line for line in metrics)  # TRL's, during training
    assert metrics[-1]["final/eval/accuracy"] == result.final_metrics["final/eval/accuracy"]
    assert (output_dir / "recipe.yaml").is_file()


def test_lora_reward_model_is_saved_merged(random_llama, marker_dataset, tmp_path):
    output_dir = tmp_path / "lora_reward_model"
    recipe = parse_reward_recipe(
        reward_flags(
            random_llama, marker_dataset, output_dir,
            "--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj", "v_proj",
            "--max_train_pairs", "32", "--max_eval_pairs", "8", "--center_rewards", "false",
        )
    )  # fmt: skip
    result = train_reward_model(recipe)

    assert not (output_dir / "adapter_config.json").exists()
    reloaded = AutoModelForSequenceClassification.from_pretrained(output_dir)
    assert not any("lora" in name for name, _ in reloaded.named_parameters())
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    sequences = [scored_token_ids(tokenizer, row["chosen"]) for row in marker_pairs(4, seed=3)]
    torch.testing.assert_close(sequence_scores(reloaded, sequences, tokenizer.pad_token_id), sequence_scores(result.model, sequences, tokenizer.pad_token_id))
    # The score head trained (LoRA's task type SEQ_CLS saves it in full): it differs from a fresh head.
    fresh = AutoModelForSequenceClassification.from_pretrained(random_llama, num_labels=1)
    assert not torch.equal(fresh.score.weight, reloaded.score.weight)


def test_reward_model_keeps_the_first_layers_of_its_base(random_llama, marker_dataset, tmp_path):
    output_dir = tmp_path / "shallow_reward_model"
    flags = ["--max_train_pairs", "16", "--max_eval_pairs", "8", "--learning_rate", "0"]
    train_reward_model(
        parse_reward_recipe(reward_flags(random_llama, marker_dataset, output_dir, *flags, "--num_hidden_layers", "1"))
    )

    reloaded = AutoModelForSequenceClassification.from_pretrained(output_dir)
    base = LlamaForCausalLM.from_pretrained(random_llama)
    assert reloaded.config.num_hidden_layers == len(reloaded.model.layers) == 1
    # Nothing trained (learning rate 0): the kept layer is the base's first, unchanged.
    for name, weight in base.model.layers[0].state_dict().items():
        torch.testing.assert_close(reloaded.model.layers[0].state_dict()[name], weight)

    too_deep = tmp_path / "too_deep"
    with pytest.raises(RecipeError, match="num_hidden_layers: 3; .* has 2 layers: keep between 1 and 2"):
        too_deep_flags = reward_flags(random_llama, marker_dataset, too_deep, *flags, "--num_hidden_layers", "3")
        train_reward_model(parse_reward_recipe(too_deep_flags))
    assert not too_deep.exists()


def test_scored_sequence_is_the_prompt_ppo_renders_then_the_completion_then_eos(random_llama):
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(random_llama)))
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]
    prompt = tokenizer.apply_chat_template(conversation[:1], add_generation_prompt=True, tokenize=False)
    ids = scored_token_ids(tokenizer, conversation)
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids) == prompt + "Hello there." + tokenizer.eos_token


def test_preference_builder_writes_well_formed_deterministic_pairs(tiny_models, tmp_path):
    def build(folder: Path, *overrides: str):
        flags = [
            "--config", str(TINY_REWARD_RECIPE),
            "--policy_name_or_path", str(tiny_models["policy"]),
            "--dataset_name", str(folder),
            "--max_train_prompts", "6", "--max_test_prompts", "4", "--max_new_tokens", "6",
            "--generation_batch_size", "4", "--min_score_gap", "0",
            *overrides,
        ]  # fmt: skip
        return build_preferences(parse_reward_recipe(flags))

    summary = build(tmp_path / "first")
    assert {name: split.pairs for name, split in summary.splits.items()} == {"train": 6, "test": 4}
    prompts = {json.loads(line)["prompt"] for line in (REPO_ROOT / "data/sentiment_prompts/test.jsonl").open()}
    for name, count in (("train.jsonl", 6), ("test.jsonl", 4)):
        rows = [json.loads(line) for line in (tmp_path / "first" / name).read_text().splitlines()]
        assert len(rows) == count
        for row in rows:
            assert set(row) == {"chosen", "rejected", "chosen_score", "rejected_score"}
            for side in ("chosen", "rejected"):
                assert [message["role"] for message in row[side]] == ["user", "assistant"]
                assert isinstance(row[side][1]["content"], str)
            assert row["chosen"][0] == row["rejected"][0]
            assert 1.0 >= row["chosen_score"] >= row["rejected_score"] >= -1.0
            assert (row["chosen"][0]["content"] in prompts) == (name == "test.jsonl")

    # Three completions per prompt, no gap: every two of them make a pair.
    summary = build(tmp_path / "three", "--completions_per_prompt", "3")
    assert {name: split.pairs for name, split in summary.splits.items()} == {"train": 18, "test": 12}
    with pytest.raises(RecipeError, match="completions_per_prompt: 1 is out of range; it must be at least 2"):
        build(tmp_path / "one", "--completions_per_prompt", "1")
    assert not (tmp_path / "one").exists()

    build(tmp_path / "second")
    for name in ("train.jsonl", "test.jsonl"):
        assert (tmp_path / "first" / name).read_text() == (tmp_path / "second" / name).read_text()

    with pytest.raises(RecipeError, match="already holds train.jsonl, test.jsonl.*--overwrite_preferences true"):
        build(tmp_path / "first")
    build(tmp_path / "first", "--overwrite_preferences", "true", "--sampling_seed", "1")


def test_every_two_completions_of_a_prompt_far_enough_apart_make_a_pair():
    gold_scores = {"a": 0.9, "b": 0.1, "c": 0.7, "d": -0.5}

    def gold(prompts, completions):
        return [gold_scores[completion] for completion in completions]

    completions = [["a", "b", "c", "d"], ["b", "c", "a", "d"]]
    rows = preference_rows(["P", "Q"], completions, FunctionSource(gold), min_score_gap=0.5)
    pairs = [(row["chosen"][0]["content"], row["chosen"][1]["content"], row["rejected"][1]["content"]) for row in rows]
    # a–c (0.2 apart) is dropped for both prompts; the higher-scored completion is chosen.
    assert pairs == [
        ("P", "a", "b"), ("P", "a", "d"), ("P", "c", "b"), ("P", "b", "d"), ("P", "c", "d"),
        ("Q", "c", "b"), ("Q", "a", "b"), ("Q", "b", "d"), ("Q", "c", "d"), ("Q", "a", "d"),
    ]  # fmt: skip
    assert all(row["chosen_score"] - row["rejected_score"] >= 0.5 for row in rows)
    assert rows[0]["chosen_score"] == 0.9 and rows[0]["rejected_score"] == 0.1


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lora_task_type", "CAUSAL_LM"], "lora_task_type: 'CAUSAL_LM' cannot train a reward model"),
        (["--eos_token", "<|im_end|>"], "eos_token is not read by the reward recipe"),
        (["--load_in_4bit", "true"], "load_in_4bit/load_in_8bit"),
        (["--no_such_field", "1"], "no_such_field"),
    ],
)
def test_recipe_refuses_fields_it_does_not_read(flags, message):
    with pytest.raises(RecipeError, match=message):
        parse_reward_recipe(["--config", str(TINY_REWARD_RECIPE), *flags])


def test_recipe_file_with_unknown_key_or_wrong_type_is_an_error(tmp_path):
    base = TINY_REWARD_RECIPE.read_text()
    unknown, wrong_type = tmp_path / "unknown.yaml", tmp_path / "wrong.yaml"
    unknown.write_text(base + "margin_threshold: 0.3\n")
    wrong_type.write_text(base.replace("max_new_tokens: 8", "max_new_tokens: eight"))
    with pytest.raises(RecipeError, match="unknown.yaml: unknown key 'margin_threshold'"):
        parse_reward_recipe(["--config", str(unknown)])
    with pytest.raises(RecipeError, match="wrong.yaml: key 'max_new_tokens' has str value 'eight', expected int"):
        parse_reward_recipe(["--config", str(wrong_type)])


def test_training_refuses_a_non_empty_output_dir(random_llama, marker_dataset, tmp_path):
    output_dir = tmp_path / "taken"
    output_dir.mkdir()
    (output_dir / "keep.txt").write_text("mine")
    with pytest.raises(RecipeError, match="output_dir: .* is not empty"):
        train_reward_model(parse_reward_recipe(reward_flags(random_llama, marker_dataset, output_dir)))
    assert [path.name for path in output_dir.iterdir()] == ["keep.txt"]


@pytest.mark.slow
def test_scripts_build_then_train_on_the_tiny_recipe(tiny_models, tmp_path):
    pairs, output_dir = tmp_path / "pairs", tmp_path / "reward_model"
    flags = [
        "--config", str(TINY_REWARD_RECIPE),
        "--policy_name_or_path", str(tiny_models["policy"]),
        "--model_name_or_path", str(tiny_models["policy"]),
        "--dataset_name", str(pairs),
        "--output_dir", str(output_dir),
        "--max_train_prompts", "8", "--max_test_prompts", "4",
    ]  # fmt: skip
    built = run_python(["scripts/build_preferences.py", *flags], cwd=REPO_ROOT)
    assert built.returncode == 0, built.stderr
    assert "train: 8 pairs from 8 prompts" in built.stdout
    trained = run_python(["scripts/train_reward.py", *flags], cwd=REPO_ROOT)
    assert trained.returncode == 0, trained.stderr
    assert AutoModelForSequenceClassification.from_pretrained(output_dir).config.num_labels == 1
