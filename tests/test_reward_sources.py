"""Reward sources (reward_models/sources.py): functions, reward models with their own tokenizer, weighted sums, and
the adapter that lets TRL's PPOTrainer score with any of them (checked through TRL's own `get_reward`)."""

import os

# As in recipes/engine.py: trl.experimental warns on import otherwise.
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import PROMPTS, REPO_ROOT, TINY_RECIPE, read_metrics  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)
from trl.experimental.utils import get_reward  # noqa: E402

from recipes import DataArguments, ModelArguments, RecipeError, parse_recipe, run_ppo  # noqa: E402
from recipes.data import tokenize_prompts  # noqa: E402
from recipes.models import check_reward_block, load_reward_model, load_tokenizer  # noqa: E402
from recipes.tiny_models import tiny_llama_config  # noqa: E402
from reward_models import functions  # noqa: E402
from reward_models.sources import (  # noqa: E402
    FunctionSource,
    ModelSource,
    PolicyTextDecoder,
    RewardSourceModel,
    WeightedSum,
)

COMPLETIONS = [" was great fun", " is awful and slow", " made me happy today", " was fine."]

# The reward model's own vocabulary: every word of the prompts and completions above, and of its chat template.
WORDS = " ".join(PROMPTS + COMPLETIONS) + " user assistant : ."

CHAT_TEMPLATE = (
    "{% for message in messages %}[BOS]{{ message['role'] }} : {{ message['content'] }}[EOS]{% endfor %}"
    "{% if add_generation_prompt %}[BOS]assistant :{% endif %}"
)


def constant(prompts: list[str], completions: list[str]) -> list[float]:
    return [1.0] * len(completions)


def build_word_level_reward_model(folder, chat_template: str | None = None):
    """A tiny one-label Llama classifier whose tokenizer (word-level, lowercased, trained here on `WORDS`, [BOS]
    added in front) shares nothing with the policy's SmolLM2 tokenizer. Saved to `folder`."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    special = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    tokenizer.train_from_iterator([WORDS], trainers.WordLevelTrainer(special_tokens=special))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", tokenizer.token_to_id("[BOS]"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )
    fast.chat_template = chat_template
    torch.manual_seed(0)
    config = tiny_llama_config(len(fast), num_labels=1, pad_token_id=fast.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def policy_tokenizer(tiny_models):
    return load_tokenizer(ModelArguments(model_name_or_path=str(tiny_models["policy"])))


def policy_rows(tokenizer, prompt_ids: list[list[int]], completions: list[str], eos_rows: set[int]) -> tuple:
    """(query_responses [batch, seq], context_length) as TRL builds them: prompts left-padded to the widest,
    completions (EOS-terminated in `eos_rows`) right-padded after them, pad = the policy's pad token."""
    pad = tokenizer.pad_token_id
    width = max(len(ids) for ids in prompt_ids)
    responses = [
        tokenizer(text, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if i in eos_rows else [])
        for i, text in enumerate(completions)
    ]
    response_width = max(len(ids) for ids in responses) + 2  # and a column or two of padding after the longest
    rows = [[pad] * (width - len(p)) + p + r + [pad] * (response_width - len(r)) for p, r in zip(prompt_ids, responses)]
    return torch.tensor(rows), width


def kit_prompt_ids(tokenizer, prompts: list[str], as_user_message: bool) -> list[list[int]]:
    """The prompts tokenised by the kit's data pipeline (rendered as one user turn, or plain)."""
    data_args = DataArguments(prompt_as_user_message=as_user_message, max_prompt_length=512)
    tokenized, _ = tokenize_prompts(Dataset.from_dict({"prompt": prompts}), data_args, tokenizer)
    return tokenized["input_ids"]


# --- functions and sums -----------------------------------------------------------------------------------------


def test_function_source_and_weighted_sum_give_the_expected_numbers():
    completions = ["one two three four", "", " ".join(["word"] * 30), "a b"]
    prompts = ["p"] * len(completions)
    length = FunctionSource.from_spec("reward_models.functions:length")
    assert length.name == "length"
    assert length(prompts, completions).tolist() == pytest.approx([4 / 20, 0.0, 1.0, 2 / 20])

    total = WeightedSum([(0.5, length), (2.0, FunctionSource(constant))])
    scores = total(prompts, completions)
    assert scores.tolist() == pytest.approx([0.5 * 0.2 + 2, 2.0, 0.5 + 2, 0.5 * 0.1 + 2])
    parts = total.last_scores_by_part(scores)
    assert list(parts) == ["length", "constant"]
    assert parts["length"].tolist() == pytest.approx([0.2, 0.0, 1.0, 0.1])
    assert parts["constant"].tolist() == [1.0] * 4


def test_weighted_sum_names_repeated_sources_apart():
    total = WeightedSum([(1.0, FunctionSource.from_spec("length")), (-1.0, FunctionSource.from_spec("length"))])
    assert total(["p"], ["a b c d"]).tolist() == [0.0]
    assert list(total.last_scores_by_part(torch.zeros(1))) == ["length", "length_2"]


def test_built_in_functions():
    prompts = [""] * 5
    endings = ["Done.", "not done", 'She said "yes!"  ', "", "Really?)"]
    assert functions.ends_with_punctuation(prompts, endings) == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert functions.length(prompts[:2], ["", " ".join(["w"] * 40)]) == [0.0, 1.0]
    happy, sad = functions.sentiment(prompts[:2], ["What a wonderful, happy day!", "This is terrible and sad."])
    assert happy > 0.5 and sad < -0.5
    assert FunctionSource.from_spec("sentiment").function is functions.sentiment


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_builtin", r"has no function 'no_such_builtin' \(not a built-in"),
        ("no_such_package.rewards:score", "cannot import module 'no_such_package.rewards'"),
        ("reward_models.functions:no_such_function", "module 'reward_models.functions' has no function"),
        ("reward_models.functions:LENGTH_TARGET_WORDS", r"is not callable \(its type is int\)"),
        ("reward_models.functions:", "is not of the form 'package.module:function'"),
    ],
)
def test_function_source_errors_name_the_entry(spec, message):
    with pytest.raises(RecipeError, match="^reward_functions: .*" + message):
        FunctionSource.from_spec(spec)


def test_function_returning_the_wrong_number_of_scores_is_an_error():
    source = FunctionSource(lambda prompts, completions: [1.0], name="short")
    with pytest.raises(RecipeError, match="reward function 'short' returned 1 scores for 2 completions"):
        source(["a", "b"], ["c", "d"])


# --- decoding the policy's tokens ---------------------------------------------------------------------------------


def test_policy_text_decoder_gives_back_the_original_prompts(policy_tokenizer):
    decoder = PolicyTextDecoder(policy_tokenizer)
    for as_user_message in (False, True):
        ids = kit_prompt_ids(policy_tokenizer, PROMPTS[:3], as_user_message)
        assert [decoder.prompt(row) for row in ids] == PROMPTS[:3]
    # A multi-turn conversation cannot be one prompt string: the rendered text is handed over, markers included.
    conversation = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"},
    ]
    rendered = policy_tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert decoder.prompt(policy_tokenizer(rendered, add_special_tokens=False)["input_ids"]) == rendered
    completion_ids = policy_tokenizer(" fine.", add_special_tokens=False)["input_ids"] + [policy_tokenizer.eos_token_id]
    assert decoder.completion(completion_ids) == " fine."


# --- a reward model with another tokenizer, through TRL's get_reward -----------------------------------------------


@pytest.mark.parametrize("chat_template", [None, CHAT_TEMPLATE], ids=["plain", "chat_template"])
@pytest.mark.parametrize("as_user_message", [False, True], ids=["plain_prompts", "chat_prompts"])
def test_reward_model_with_its_own_tokenizer_scores_as_when_called_directly(
    policy_tokenizer, tmp_path, chat_template, as_user_message
):
    folder = build_word_level_reward_model(tmp_path / "word_level_reward", chat_template)
    reward_tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    reward_model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert reward_tokenizer("The movie was")["input_ids"][0] == reward_tokenizer.bos_token_id

    prompts = PROMPTS[:4]
    expected = []
    for prompt, completion in zip(prompts, COMPLETIONS):
        if chat_template:
            conversation = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            text = reward_tokenizer.apply_chat_template(conversation, tokenize=False)
            inputs = reward_tokenizer(text, add_special_tokens=False, return_tensors="pt")
        else:
            inputs = reward_tokenizer(prompt + completion, return_tensors="pt")
        assert reward_tokenizer.unk_token_id not in inputs["input_ids"][0]
        with torch.no_grad():
            expected.append(reward_model(**inputs).logits[0, 0].item())

    adapter = RewardSourceModel(ModelSource(reward_model, reward_tokenizer), policy_tokenizer)
    prompt_ids = kit_prompt_ids(policy_tokenizer, prompts, as_user_message)
    query_responses, context_length = policy_rows(policy_tokenizer, prompt_ids, COMPLETIONS, eos_rows={0, 2})
    adapter.scoring_context.prompt_width = context_length
    _, scores, _ = get_reward(adapter, query_responses, policy_tokenizer.pad_token_id, context_length)

    assert len(set(expected)) == len(expected)  # distinct scores: a row mix-up would show
    assert scores.tolist() == pytest.approx(expected, abs=1e-5)
    total, count = adapter.take_logged_sums()["reward_model"]
    assert count == 4 and total == pytest.approx(sum(expected), abs=1e-4)


def test_reward_model_reads_the_completion_closed_by_eos_not_the_template_tail(tiny_models):
    """The kit's reward training reads each score at the EOS that closes the assistant turn. SmolLM2's template
    renders a newline after it: a reward model scored on the whole rendered conversation would read its score
    there, where it never learnt one. Through `ModelSource` it reads what it was trained on."""
    reward_tokenizer = AutoTokenizer.from_pretrained(tiny_models["reward"])
    assert reward_tokenizer.pad_token_id == reward_tokenizer.eos_token_id  # SmolLM2 pads with EOS
    reward_model = AutoModelForSequenceClassification.from_pretrained(tiny_models["reward"]).eval()
    source = ModelSource(reward_model, reward_tokenizer)
    assert reward_tokenizer.pad_token_id != reward_tokenizer.eos_token_id

    def last_token_score(text: str) -> float:
        ids = reward_tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            return reward_model.score(reward_model.model(input_ids=ids).last_hidden_state[0, -1]).item()

    closed_by_eos, whole_template = [], []
    for prompt, completion in zip(PROMPTS[:4], COMPLETIONS):
        conversation = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        rendered = reward_tokenizer.apply_chat_template(conversation, tokenize=False)
        assert rendered.endswith(reward_tokenizer.eos_token + "\n")
        closed_by_eos.append(last_token_score(rendered.removesuffix("\n")))
        whole_template.append(last_token_score(rendered))

    scores = source(PROMPTS[:4], COMPLETIONS)
    assert scores.tolist() == pytest.approx(closed_by_eos, abs=1e-5)
    assert scores.tolist() != pytest.approx(whole_template, abs=1e-3)


def test_reward_model_sharing_the_policy_tokenizer_adds_to_a_sum_as_trl_scores_it(tiny_models, policy_tokenizer):
    """In a sum, a reward model that reads the policy's tokens scores them exactly as TRL does on its own."""
    reward_model = AutoModelForSequenceClassification.from_pretrained(tiny_models["reward"]).eval()
    reward_model.config.pad_token_id = policy_tokenizer.pad_token_id
    prompt_ids = kit_prompt_ids(policy_tokenizer, PROMPTS[:4], as_user_message=True)
    query_responses, context_length = policy_rows(policy_tokenizer, prompt_ids, COMPLETIONS, eos_rows={1})
    pad = policy_tokenizer.pad_token_id
    _, native, _ = get_reward(reward_model, query_responses, pad, context_length)

    total = WeightedSum([(3.0, FunctionSource(constant))])
    adapter = RewardSourceModel(total, policy_tokenizer, token_model=reward_model, token_model_weight=0.5)
    adapter.scoring_context.prompt_width = context_length
    _, combined, _ = get_reward(adapter, query_responses, pad, context_length)
    assert combined.tolist() == pytest.approx((0.5 * native + 3.0).tolist(), abs=1e-5)
    logged = adapter.take_logged_sums()
    assert logged["reward_model"][0] == pytest.approx(native.sum().item(), abs=1e-4)
    assert logged["constant"] == (4.0, 4)
    assert adapter.take_logged_sums() == {}


def test_adapter_refuses_to_guess_where_prompts_end(policy_tokenizer):
    adapter = RewardSourceModel(FunctionSource(constant), policy_tokenizer)
    prompt_ids = kit_prompt_ids(policy_tokenizer, PROMPTS[:2], as_user_message=False)
    query_responses, context_length = policy_rows(policy_tokenizer, prompt_ids, COMPLETIONS[:2], eos_rows=set())
    pad = policy_tokenizer.pad_token_id
    with pytest.raises(RuntimeError, match="prompt_width is None"):
        get_reward(adapter, query_responses, pad, context_length)
    # Where the shortest prompt starts: its row is padding in the column before.
    adapter.scoring_context.prompt_width = context_length - min(len(ids) for ids in prompt_ids)
    with pytest.raises(RuntimeError, match="out of step"):
        get_reward(adapter, query_responses, pad, context_length)


# --- the recipe's reward block ------------------------------------------------------------------------------------


def reward_args(tiny_models, **fields) -> ModelArguments:
    return ModelArguments(model_name_or_path=str(tiny_models["policy"]), **fields)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({}, "no reward: set reward_model_name_or_path"),
        ({"reward_functions": ["length"]}, "value_model_init: 'reward_model' needs a reward model"),
        ({"reward_functions": ["length"], "value_model_init": "policy", "reward_weights": [1, 2]}, "2 weights for 1"),
        (
            {"reward_functions": ["length"], "value_model_init": "policy", "reward_model_tokenizer": "own"},
            "reward_model_tokenizer: 'own' applies to reward_model_name_or_path",
        ),
    ],
)
def test_reward_block_errors(tiny_models, fields, message):
    with pytest.raises(RecipeError, match=message):
        check_reward_block(reward_args(tiny_models, **fields))


def test_own_tokenizer_reward_model_cannot_initialise_the_value_model(tiny_models):
    args = reward_args(tiny_models, reward_model_name_or_path=str(tiny_models["reward"]), reward_model_tokenizer="own")
    with pytest.raises(RecipeError, match="reward_model_tokenizer is 'own'; set value_model_init: policy"):
        check_reward_block(args)


def test_load_reward_model_keeps_trl_native_path_for_a_lone_reward_model(tiny_models, policy_tokenizer):
    args = reward_args(tiny_models, reward_model_name_or_path=str(tiny_models["reward"]))
    assert isinstance(load_reward_model(args, policy_tokenizer), LlamaForSequenceClassification)
    args.reward_weights = [2.0]
    weighted = load_reward_model(args, policy_tokenizer)
    assert isinstance(weighted, RewardSourceModel) and weighted.scorer.token_model_weight == 2.0


def test_load_reward_model_builds_the_weighted_sum(tiny_models, policy_tokenizer, tmp_path):
    folder = build_word_level_reward_model(tmp_path / "word_level_reward")
    args = reward_args(
        tiny_models,
        reward_model_name_or_path=str(folder),
        reward_model_tokenizer="own",
        value_model_init="policy",
        reward_functions=["length", "reward_models.functions:ends_with_punctuation"],
        reward_weights=[1.0, 0.5, -2.0],
    )
    reward = load_reward_model(args, policy_tokenizer)
    total = reward.scorer.source
    assert reward.scorer.token_model is None
    assert total.weights == [1.0, 0.5, -2.0]
    assert total.part_names == ["reward_model", "length", "ends_with_punctuation"]
    assert isinstance(total.parts[0], ModelSource)
    assert total.parts[0].tokenizer.chat_template is None and total.parts[0].tokenizer.pad_token == "[PAD]"


# --- PPO runs -----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ppo_run_logs_each_source_of_a_weighted_sum(tiny_models, prompt_files, tmp_path):
    """A reward model with its own tokenizer plus two functions, through TRL's unchanged training loop: every update
    logs each source's mean, and TRL's score is their weighted sum."""
    folder = build_word_level_reward_model(tmp_path / "word_level_reward", CHAT_TEMPLATE)
    output_dir = run_ppo(
        parse_recipe(
            [
                "--config", str(TINY_RECIPE),
                "--model_name_or_path", str(tiny_models["policy"]),
                "--dataset_name", str(prompt_files["jsonl"]),
                "--reward_model_name_or_path", str(folder),
                "--reward_model_tokenizer", "own",
                "--value_model_init", "policy",
                "--reward_functions", "length", "ends_with_punctuation",
                "--reward_weights", "1.0", "0.5", "-2.0",
                "--num_sample_generations", "1",
                "--output_dir", str(tmp_path / "run"),
            ]  # fmt: skip
        )
    )
    metrics = read_metrics(output_dir / "metrics.jsonl")
    assert len(metrics) == 2
    for row in metrics:
        parts = {name: row[f"reward/{name}"] for name in ("reward_model", "length", "ends_with_punctuation")}
        weighted = parts["reward_model"] + 0.5 * parts["length"] - 2.0 * parts["ends_with_punctuation"]
        assert row["objective/scores"] == pytest.approx(weighted, abs=1e-5)


@pytest.mark.slow
def test_ppo_learns_from_a_function_reward(tiny_models, tmp_path):
    """PPO moves the tiny random policy where a function reward points: toward short responses, rewarded by the
    built-in `length` with weight -1 (TRL's training loop, the kit's adapter, nothing mocked).

    Why these settings: at the recipe's temperature 0.7 the random 49k-token policy samples almost uniformly
    (entropy 10.8 nats) and no text statistic moves within a few updates (measured: 10 updates, Adam 1e-3, no
    trend). At temperature 0.1 the logit of the token just read stands out (tied embeddings), so the policy can
    repeat tokens (one long word, blank lines) or vary them, and PPO picks what the reward asks. Full fine-tuning
    with SGD (lr 0.05, 4 PPO epochs, no KL penalty) does so within two updates; Adam at 1e-3 to 3e-3 got shorter
    in only 3 of 7 runs, its sign-sized steps on all 49k embedding rows drifting the others (entropy up to 9 nats).

    Measured (batch 8 episodes, response 8 tokens; reward/length is min(1, words / 20), so 0.05 is one word and
    0.4 is eight):
    - noise, learning_rate 0 (seeds 1, 2, 3 × 5 updates): per-update mean reward/length 0.251 ± 0.050 (sd),
      range 0.138-0.325;
    - this run (seed 1): 0.29, 0.39, 0.0, 0.0; seed 2: 0.21, 0.05, 0.05, 0.05; seed 3: 0.21, 0.05, 0.05, 0.05;
    - weight +1 instead (sign control, seeds 1 and 2, 5 updates): 0.4 from the second update on, so the direction
      comes from the reward, not from the optimiser.
    The bound, 0.1 (two words) in each of the last two updates, is 3 noise sds under the no-learning mean and
    under its lowest update of 15."""
    output_dir = run_ppo(
        parse_recipe(
            [
                "--model_name_or_path", str(tiny_models["policy"]),
                "--dtype", "float32",
                "--use_peft", "false",
                "--value_model_init", "policy",
                "--reward_functions", "length",
                "--reward_weights", "-1",
                "--dataset_name", str(REPO_ROOT / "data" / "sentiment_prompts"),
                "--prompt_as_user_message", "true",
                "--max_prompt_length", "64",
                "--max_train_prompts", "256",
                "--max_eval_prompts", "8",
                "--output_dir", str(tmp_path / "run"),
                "--seed", "1",
                "--optim", "sgd",
                "--learning_rate", "0.05",
                "--num_ppo_epochs", "4",
                "--kl_coef", "0",
                "--temperature", "0.1",
                "--response_length", "8",
                "--stop_token", "eos",
                "--per_device_train_batch_size", "8",
                "--num_mini_batches", "2",
                "--local_rollout_forward_batch_size", "8",
                "--total_episodes", "32",
                "--num_sample_generations", "0",
                "--report_to", "none",
                "--logging_steps", "1",
            ]  # fmt: skip
        )
    )
    lengths = [row["reward/length"] for row in read_metrics(output_dir / "metrics.jsonl")]
    assert len(lengths) == 4
    assert 0.1 < lengths[0] < 0.4  # the untrained policy, inside the no-learning range
    assert max(lengths[2:]) <= 0.1, f"reward/length per update: {lengths}"
