"""Reward sources (recipes/rewards/sources.py): the one scoring interface, `RewardSource.score(Episodes) -> Scores`,
for functions, reward models reading the policy's tokens or their own tokenizer's rendering, and weighted sums;
how a recipe's reward block becomes one; and PPO runs scoring with them."""

import pytest
import torch
from conftest import PROMPTS, REPO_ROOT, TINY_RECIPE, read_metrics
from datasets import Dataset
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaForSequenceClassification
from transformers import PreTrainedTokenizerFast

from recipes import DataArguments, ModelArguments, RecipeError, parse_recipe, run_ppo
from recipes.data import collate_prompts, tokenize_prompts
from recipes.models import check_reward_block, load_reward, load_tokenizer
from recipes.rewards.sources import (
    Episodes,
    FunctionSource,
    ModelSource,
    Scores,
    WeightedSum,
    last_token_scores,
    padded_batches,
    scored_token_ids,
    sequence_scores,
)
from recipes.tiny_models import tiny_llama_config

COMPLETIONS = [" was great fun", " is awful and slow", " made me happy today", " was fine."]

# The reward model's own vocabulary: every word of the prompts and completions above, and of its chat template.
WORDS = " ".join(PROMPTS + COMPLETIONS) + " user assistant system : ."

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


@pytest.fixture(scope="module")
def tiny_reward_model(tiny_models):
    return AutoModelForSequenceClassification.from_pretrained(tiny_models["reward"]).eval()


def kit_prompt_batch(tokenizer, prompts: list[str], as_user_message: bool):
    """The prompts as the kit's data pipeline batches them (rendered as one user turn, or plain): a PromptBatch."""
    data_args = DataArguments(prompt_as_user_message=as_user_message, max_prompt_length=512)
    tokenized, _ = tokenize_prompts(Dataset.from_dict({"prompt": prompts}), data_args, tokenizer)
    return collate_prompts(list(tokenized), tokenizer.pad_token_id)


def policy_episodes(tokenizer, prompts: list[str], completions: list[str], eos_rows: set[int], as_user_message: bool):
    """Episodes as the PPO rollout builds them: the kit's left-padded prompt ids, then the completions' tokens
    (EOS-terminated in `eos_rows`) right-padded with the policy's pad token, and the texts."""
    batch = kit_prompt_batch(tokenizer, prompts, as_user_message)
    pad = tokenizer.pad_token_id
    responses = [
        tokenizer(text, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if i in eos_rows else [])
        for i, text in enumerate(completions)
    ]
    width = max(len(ids) for ids in responses) + 2  # and a column or two of padding after the longest
    padded = torch.tensor([ids + [pad] * (width - len(ids)) for ids in responses])
    token_ids = torch.cat([batch.input_ids, padded], 1)
    return Episodes(batch.prompts, completions, batch.conversations, token_ids, pad)


def direct_last_token_score(model, ids: list[int]) -> float:
    """The classifier's score head on its backbone's last hidden state of the unpadded `ids`: no mask, no padding,
    no pad-id search."""
    with torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        return model.score(hidden).item()


# --- functions and sums -----------------------------------------------------------------------------------------


def test_function_source_and_weighted_sum_give_the_expected_numbers():
    completions = ["one two three four", "", " ".join(["word"] * 30), "a b"]
    episodes = Episodes(prompts=["p"] * len(completions), completions=completions)
    length = FunctionSource.from_spec("recipes.rewards.functions:length")
    assert length.name == "length"
    scores = length.score(episodes)
    assert isinstance(scores, Scores)
    assert scores.total.dtype == torch.float32 and scores.total.device.type == "cpu"
    assert scores.total.tolist() == pytest.approx([4 / 20, 0.0, 1.0, 2 / 20])
    assert list(scores.by_source) == ["length"] and torch.equal(scores.by_source["length"], scores.total)

    total = WeightedSum([(0.5, length), (2.0, FunctionSource(constant))])
    summed = total.score(episodes)
    assert summed.total.tolist() == pytest.approx([0.5 * 0.2 + 2, 2.0, 0.5 + 2, 0.5 * 0.1 + 2])
    # Each part unweighted, under its own name.
    assert list(summed.by_source) == ["length", "constant"]
    assert summed.by_source["length"].tolist() == pytest.approx([0.2, 0.0, 1.0, 0.1])
    assert summed.by_source["constant"].tolist() == [1.0] * 4


def test_weighted_sum_names_repeated_sources_apart():
    total = WeightedSum([(1.0, FunctionSource.from_spec("length")), (-1.0, FunctionSource.from_spec("length"))])
    scores = total.score(Episodes(["p"], ["a b c d"]))
    assert scores.total.tolist() == [0.0]
    assert total.part_names == ["length", "length_2"]
    assert list(scores.by_source) == ["length", "length_2"]
    assert scores.by_source["length"].tolist() == scores.by_source["length_2"].tolist() == [pytest.approx(0.2)]


def test_weighted_sum_of_nothing_is_refused():
    with pytest.raises(RecipeError, match="needs at least one source"):
        WeightedSum([])


def test_function_source_passes_the_prompts_and_reads_a_tensor():
    """A function sees the episodes' prompts beside their completions, and may return a tensor of any shape [B]."""
    def prompt_words(prompts, completions):
        return torch.tensor([[float(len(p.split()))] for p in prompts], dtype=torch.float64)

    source = FunctionSource(prompt_words)
    assert source.name == "prompt_words"
    scores = source.score(Episodes(["a b c", "d"], ["x", "y"]))
    assert scores.total.tolist() == [3.0, 1.0] and scores.total.dtype == torch.float32


def test_a_non_finite_score_is_passed_on():
    # The PPO loop, not the source, decides what to do with it (it skips and counts such updates).
    source = FunctionSource(lambda prompts, completions: [1.0, float("nan")], name="flaky")
    assert torch.isnan(source.score(Episodes(["a", "b"], ["c", "d"])).total[1])


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_builtin", r"has no function 'no_such_builtin' \(not a built-in"),
        ("no_such_package.rewards:score", "cannot import module 'no_such_package.rewards'"),
        ("recipes.rewards.functions:no_such_function", "module 'recipes.rewards.functions' has no function"),
        ("recipes.rewards.functions:LENGTH_TARGET_WORDS", r"is not callable \(its type is int\)"),
        ("recipes.rewards.functions:", "is not of the form 'package.module:function'"),
        (":length", "is not of the form 'package.module:function'"),
        ("recipes.rewards.functions:not-a-name", "is not of the form 'package.module:function'"),
    ],
)
def test_function_source_errors_name_the_entry(spec, message):
    with pytest.raises(RecipeError, match="^reward_functions: .*" + message):
        FunctionSource.from_spec(spec)


def test_a_module_failing_on_import_is_named_with_its_error(tmp_path, monkeypatch):
    (tmp_path / "broken_reward.py").write_text("raise RuntimeError('no GPU here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RecipeError, match=r"^reward_functions: cannot import module 'broken_reward' .*RuntimeError: "
                                          "no GPU here"):  # fmt: skip
        FunctionSource.from_spec("broken_reward:score")


def test_function_returning_the_wrong_number_of_scores_is_an_error():
    source = FunctionSource(lambda prompts, completions: [1.0], name="short")
    with pytest.raises(RecipeError, match="reward function 'short' returned 1 scores for 2 completions"):
        source.score(Episodes(["a", "b"], ["c", "d"]))


# --- a reward model reading the policy's tokens --------------------------------------------------------------------


@pytest.mark.parametrize("as_user_message", [False, True], ids=["plain_prompts", "chat_prompts"])
def test_reward_model_on_policy_tokens_scores_the_last_response_token(
    policy_tokenizer, tiny_reward_model, as_user_message
):
    """Left-padded prompts, right-padded responses, some closed by EOS: each row's score is the one the model gives
    the unpadded prompt + response read at its last token (EOS where there is one), in any batch size."""
    episodes = policy_episodes(policy_tokenizer, PROMPTS[:4], COMPLETIONS, {0, 2}, as_user_message)
    pad = policy_tokenizer.pad_token_id
    # The reward model's config pads with SmolLM2's EOS: a search by pad id would stop one token early at EOS.
    assert tiny_reward_model.config.pad_token_id == policy_tokenizer.eos_token_id != pad
    expected = [direct_last_token_score(tiny_reward_model, [t for t in row.tolist() if t != pad])
                for row in episodes.token_ids]  # fmt: skip
    assert len(set(expected)) == len(expected)  # distinct scores: a row mix-up would show
    assert episodes.token_ids[:, 0].eq(pad).any() and episodes.token_ids[:, -1].eq(pad).all()  # both paddings

    for batch_size in (1, 3, 16):
        source = ModelSource(tiny_reward_model, batch_size=batch_size)
        scores = source.score(episodes)
        assert scores.total.dtype == torch.float32
        assert scores.total.tolist() == pytest.approx(expected, abs=1e-5)
        assert list(scores.by_source) == ["reward_model"]


def test_reward_model_on_policy_tokens_needs_them(tiny_reward_model):
    with pytest.raises(ValueError, match="reads the policy's tokens, which these episodes do not carry"):
        ModelSource(tiny_reward_model).score(Episodes(["a"], ["b"]))


def test_reward_model_sharing_the_policy_tokenizer_adds_to_a_sum(policy_tokenizer, tiny_reward_model):
    episodes = policy_episodes(policy_tokenizer, PROMPTS[:4], COMPLETIONS, {1}, as_user_message=True)
    alone = ModelSource(tiny_reward_model).score(episodes).total
    total = WeightedSum([(0.5, ModelSource(tiny_reward_model)), (3.0, FunctionSource(constant))])
    scores = total.score(episodes)
    assert scores.total.tolist() == pytest.approx((0.5 * alone + 3.0).tolist(), abs=1e-6)
    assert scores.by_source["reward_model"].tolist() == pytest.approx(alone.tolist(), abs=1e-6)
    assert scores.by_source["constant"].tolist() == [1.0] * 4


# --- a reward model with its own tokenizer ------------------------------------------------------------------------


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

    # The policy's own tokens are in the episodes too: a source with its own tokenizer must not read them.
    episodes = policy_episodes(policy_tokenizer, prompts, COMPLETIONS, {0, 2}, as_user_message)
    assert (episodes.conversations is not None) == as_user_message
    scores = ModelSource(reward_model, reward_tokenizer, batch_size=3).score(episodes)
    assert len(set(expected)) == len(expected)  # distinct scores: a row mix-up would show
    assert scores.total.tolist() == pytest.approx(expected, abs=1e-5)
    assert scores.by_source["reward_model"].tolist() == pytest.approx(expected, abs=1e-5)


def test_own_tokenizer_renders_the_whole_conversation(policy_tokenizer, tmp_path):
    """A multi-turn chat prompt reaches the reward model whole: the ids are `scored_token_ids` of the conversation
    with the completion as the last assistant turn, and the score is read at its closing EOS."""
    folder = build_word_level_reward_model(tmp_path / "word_level_reward", CHAT_TEMPLATE)
    reward_tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    reward_model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    conversations = [
        [{"role": "system", "content": "Honestly, the service"}, {"role": "user", "content": "The movie was"}],
        [{"role": "user", "content": "My day has been"}, {"role": "assistant", "content": "made me happy today"},
         {"role": "user", "content": "The weather today is"}],
    ]  # fmt: skip
    completions = COMPLETIONS[:2]
    episodes = Episodes(["The movie was", "The weather today is"], completions, conversations)
    source = ModelSource(reward_model, reward_tokenizer)
    expected_ids = []
    for conversation, completion in zip(conversations, completions):
        full = [*conversation, {"role": "assistant", "content": completion}]
        rendered = reward_tokenizer.apply_chat_template(full, tokenize=False)
        ids = reward_tokenizer(rendered, add_special_tokens=False)["input_ids"]
        assert reward_tokenizer.unk_token_id not in ids and ids[-1] == reward_tokenizer.eos_token_id
        assert scored_token_ids(reward_tokenizer, full) == ids
        expected_ids.append(ids)
    assert [source.token_ids(p, c, conv) for p, c, conv in zip(episodes.prompts, completions, conversations)] == \
        expected_ids  # fmt: skip
    scores = source.score(episodes).total
    assert scores.tolist() == pytest.approx([direct_last_token_score(reward_model, ids) for ids in expected_ids],
                                            abs=1e-5)  # fmt: skip
    # Without the turns the reward model would read another text, and give another score.
    alone = source.score(Episodes(episodes.prompts, completions)).total
    assert alone.tolist() != pytest.approx(scores.tolist(), abs=1e-4)


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
        ids = reward_tokenizer(text, add_special_tokens=False)["input_ids"]
        return direct_last_token_score(reward_model, ids)

    closed_by_eos, whole_template = [], []
    for prompt, completion in zip(PROMPTS[:4], COMPLETIONS):
        conversation = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        rendered = reward_tokenizer.apply_chat_template(conversation, tokenize=False)
        assert rendered.endswith(reward_tokenizer.eos_token + "\n")
        closed_by_eos.append(last_token_score(rendered.removesuffix("\n")))
        whole_template.append(last_token_score(rendered))

    scores = source.score(Episodes(PROMPTS[:4], COMPLETIONS)).total
    assert scores.tolist() == pytest.approx(closed_by_eos, abs=1e-5)
    assert scores.tolist() != pytest.approx(whole_template, abs=1e-3)


# --- the scoring helpers ------------------------------------------------------------------------------------------


def test_padded_batches_pad_on_the_right_and_mask_the_padding():
    sequences = [[5, 6, 7], [8], [9, 10], [11, 12, 13, 14], [15]]
    batches = list(padded_batches(sequences, pad_id=0, batch_size=2, device=torch.device("cpu")))
    assert [ids.tolist() for ids, _, _ in batches] == [[[5, 6, 7], [8, 0, 0]], [[9, 10, 0, 0], [11, 12, 13, 14]],
                                                       [[15]]]  # fmt: skip
    assert [mask.tolist() for _, mask, _ in batches] == [[[1, 1, 1], [1, 0, 0]], [[1, 1, 0, 0], [1, 1, 1, 1]], [[1]]]
    assert [lengths.tolist() for _, _, lengths in batches] == [[3, 1], [2, 4], [1]]


def test_sequence_scores_read_each_sequence_at_its_last_token(tiny_reward_model):
    """Whatever the padding side, batch size or pad id (here the EOS id that ends the sequences)."""
    eos = tiny_reward_model.config.pad_token_id
    sequences = [[1, 400, 500, eos], [1, 600], [1, 700, 800, 900, 1000, eos], [1, 30, eos]]
    expected = [direct_last_token_score(tiny_reward_model, ids) for ids in sequences]
    assert len(set(expected)) == len(expected)
    for batch_size in (1, 2, 4):
        assert sequence_scores(tiny_reward_model, sequences, eos, batch_size).tolist() == pytest.approx(expected,
                                                                                                        abs=1e-5)
    # Left padding, read through the mask.
    width = max(len(ids) for ids in sequences)
    left = torch.tensor([[eos] * (width - len(ids)) + ids for ids in sequences])
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in sequences])
    assert last_token_scores(tiny_reward_model, left, mask).tolist() == pytest.approx(expected, abs=1e-5)
    assert sequence_scores(tiny_reward_model, [], eos).numel() == 0


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


def test_load_reward_gives_a_lone_source_unwrapped_and_a_weighted_one_in_a_sum(tiny_models):
    args = reward_args(tiny_models, reward_model_name_or_path=str(tiny_models["reward"]))
    alone = load_reward(args)
    assert isinstance(alone, ModelSource) and alone.tokenizer is None
    args.reward_weights = [2.0]
    weighted = load_reward(args)
    assert isinstance(weighted, WeightedSum)
    assert weighted.weights == [2.0] and weighted.part_names == ["reward_model"]
    assert isinstance(weighted.parts[0], ModelSource)
    functions_only = load_reward(reward_args(tiny_models, reward_functions=["length"], value_model_init="policy"))
    assert isinstance(functions_only, FunctionSource) and functions_only.name == "length"


def test_load_reward_builds_the_weighted_sum(tiny_models, tmp_path):
    folder = build_word_level_reward_model(tmp_path / "word_level_reward")
    args = reward_args(
        tiny_models,
        reward_model_name_or_path=str(folder),
        reward_model_tokenizer="own",
        value_model_init="policy",
        reward_functions=["length", "recipes.rewards.functions:ends_with_punctuation"],
        reward_weights=[1.0, 0.5, -2.0],
    )
    total = load_reward(args)
    assert isinstance(total, WeightedSum)
    assert total.weights == [1.0, 0.5, -2.0]
    assert total.part_names == ["reward_model", "length", "ends_with_punctuation"]
    assert isinstance(total.parts[0], ModelSource)
    assert total.parts[0].tokenizer.chat_template is None and total.parts[0].tokenizer.pad_token == "[PAD]"

    episodes = Episodes(PROMPTS[:4], COMPLETIONS)
    scores = total.score(episodes)
    model_scores = total.parts[0].score(episodes).total
    expected = model_scores + 0.5 * torch.tensor([3 / 20, 4 / 20, 4 / 20, 2 / 20]) - 2.0 * torch.tensor([0, 0, 0, 1.0])
    assert scores.total.tolist() == pytest.approx(expected.tolist(), abs=1e-6)
    assert list(scores.by_source) == ["reward_model", "length", "ends_with_punctuation"]


# --- PPO runs -----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ppo_run_logs_each_source_of_a_weighted_sum(tiny_models, prompt_files, tmp_path):
    """A reward model with its own tokenizer plus two functions, through the kit's PPO loop: every update logs each
    source's mean, and the score PPO trains on is their weighted sum."""
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
    built-in `length` with weight -1 (the kit's PPO loop, nothing mocked).

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
