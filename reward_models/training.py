"""Pairwise (Bradley–Terry) reward-model training with TRL's RewardTrainer: check → load → train → merge →
centre or normalise (optional) → evaluate → save. Everything that can be wrong with the input is checked before the output
folder is touched.

Pairs are tokenised here, by `recipes.rewards.sources.scored_token_ids` (the sequence PPO and the evaluation score
too), and handed to the trainer as `chosen_ids`/`rejected_ids`: TRL's own conversational tokenisation would render
the whole conversation, which ends with the template's text after the EOS where the score is read.
"""

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import is_peft_model
from datasets import Dataset, Value
from transformers.integrations.deepspeed import unset_hf_deepspeed_config
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    set_seed,
)
from peft import get_peft_model
from trl import RewardTrainer, get_peft_config
from trl.trainer.reward_trainer import suppress_seqcls_warning

from recipes.data import load_data_file, load_raw_prompts
from recipes.errors import RecipeError
from recipes.models import load_tokenizer, locate_model, torch_dtype
from recipes.ppo.distributed import fsdp_on_cpu
from recipes.config import METRICS_FILE, RESOLVED_RECIPE_FILE, check_output_dir
from recipes.tracking import MetricsFileCallback, finish_wandb_run, start_wandb_run
from reward_models.config import PreferenceDataArguments, RewardModelArguments, RewardRecipe
from recipes.rewards.sources import (
    SCORING_BATCH_SIZE,
    last_token_hidden_states,
    padded_batches,
    scored_token_ids,
    sequence_scores,
)


@dataclass
class PairSplits:
    """Tokenised pairs (columns `chosen_ids`, `rejected_ids`: token ids without padding) for training and
    validation."""

    train: Dataset
    eval: Dataset
    dropped_too_long: dict[str, int]

    def describe(self, max_length: int | None) -> str:
        dropped = ", ".join(f"{count} {split}" for split, count in self.dropped_too_long.items())
        return (
            f"pairs: {len(self.train)} train, {len(self.eval)} validation; dropped as longer than {max_length} "
            f"tokens (max_length): {dropped}"
        )


@dataclass
class PairMetrics:
    """How well scores order pairs: `accuracy` is the share with chosen scored strictly above rejected,
    `margin` the mean of (chosen − rejected) score, `mean_score` the mean over both sides."""

    pairs: int
    accuracy: float
    margin: float
    mean_score: float

    def as_logs(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}/{name}": value for name, value in vars(self).items()}


@dataclass
class RewardTrainingResult:
    output_dir: Path
    model: PreTrainedModel | None
    """The saved model, merged and centred, in memory (None on processes other than the main one)."""
    tokenizer: PreTrainedTokenizerBase
    final_metrics: dict[str, float]


# The preference shapes the kit reads, as published: TRL's preference formats (conversational or plain text,
# with a `prompt` column or with the prompt implicit in both sides) and Anthropic's HH-RLHF dialogue strings.
PAIR_SHAPES = {
    "messages": "chat messages in 'chosen'/'rejected' (the prompt's turns in them, or in a 'prompt' column)",
    "text": "plain text in 'prompt', 'chosen' and 'rejected'",
    "implicit text": "plain text in 'chosen'/'rejected' that share the prompt as their start",
    "hh-rlhf dialogue": "HH-RLHF dialogue strings ('\\n\\nHuman: ...\\n\\nAssistant: ...') in 'chosen'/'rejected'",
}
HH_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def pair_shape(dataset: Dataset, source: str) -> str:
    """Which of `PAIR_SHAPES` the dataset is in, read from its columns' types (and, for text, whether its first row
    is an HH-RLHF dialogue); every row must then be in that shape: a row that is not is an error, not a guess."""
    missing = [column for column in ("chosen", "rejected") if column not in dataset.column_names]
    if missing:
        raise RecipeError(
            f"{source}: no column {' or '.join(repr(c) for c in missing)} (columns: {dataset.column_names})"
        )
    if len(dataset) == 0:
        raise RecipeError(f"{source}: no rows")
    chosen = dataset.features["chosen"]
    if not (isinstance(chosen, Value) and chosen.dtype in ("string", "large_string")):
        return "messages"
    first = dataset[0]["chosen"] or ""
    if "\n\nHuman:" in first and "\n\nAssistant:" in first:
        return "hh-rlhf dialogue"
    return "text" if "prompt" in dataset.column_names else "implicit text"


def _conversations(row: dict, row_number: int, source: str, shape: str) -> tuple[list[dict], list[dict]]:
    """(chosen, rejected) conversations of one row in `shape`, each its prompt turns then the one assistant turn
    being compared; both with the same prompt turns. Plain-text prompts are one user turn: the reward model is
    trained on the rendering it scores in PPO and evaluation (`ModelSource.token_ids`)."""
    where = f"{source}, row {row_number}"
    sides = {}
    for column in ("chosen", "rejected"):
        value = row[column]
        if shape == "messages":
            sides[column] = _messages(value, f"{where}, column '{column}'")
        elif not isinstance(value, str):
            raise RecipeError(
                f"{where}, column '{column}': {type(value).__name__}; the file holds {PAIR_SHAPES[shape]}"
            )
        elif shape == "hh-rlhf dialogue":
            sides[column] = _hh_dialogue(value, f"{where}, column '{column}'")
        else:
            sides[column] = value
    prompt = row.get("prompt")
    if shape == "messages" and isinstance(prompt, list):
        # A prompt column holding chat turns precedes assistant-only sides (TRL's explicit prompt); a plain-text
        # one beside whole conversations is ignored, as TRL's `maybe_extract_prompt` ignores it.
        turns = _messages(prompt, f"{where}, column 'prompt'")
        sides = {column: turns + messages for column, messages in sides.items()}
    elif shape == "text":
        if not isinstance(prompt, str):
            raise RecipeError(f"{where}, column 'prompt': {type(prompt).__name__}; the file holds {PAIR_SHAPES[shape]}")
        user = [{"role": "user", "content": prompt}]
        sides = {column: user + [{"role": "assistant", "content": text}] for column, text in sides.items()}
    elif shape == "implicit text":
        prompt, chosen, rejected = _split_common_prompt(sides["chosen"], sides["rejected"])
        if not prompt:
            raise RecipeError(
                f"{where}, columns 'chosen'/'rejected': no shared start to read as the prompt; give a 'prompt' column"
            )
        user = [{"role": "user", "content": prompt}]
        sides = {"chosen": user + [{"role": "assistant", "content": chosen}],
                 "rejected": user + [{"role": "assistant", "content": rejected}]}  # fmt: skip
    for column, conversation in sides.items():
        if len(conversation) < 2 or conversation[-1]["role"] != "assistant":
            raise RecipeError(f"{where}, column '{column}': must end with an assistant turn after the prompt")
    if sides["chosen"][:-1] != sides["rejected"][:-1]:
        raise RecipeError(f"{where}, columns 'chosen'/'rejected': different prompt turns (they must share them)")
    return sides["chosen"], sides["rejected"]


def _messages(value, where: str) -> list[dict]:
    """Chat turns, each with a text `role` and `content`."""
    if not isinstance(value, list) or not value:
        raise RecipeError(f"{where}: must be a non-empty list of chat messages ({{role, content}})")
    for turn, message in enumerate(value, start=1):
        if not isinstance(message, dict) or not all(isinstance(message.get(k), str) for k in ("role", "content")):
            raise RecipeError(f"{where}: message {turn} is not a {{role, content}} pair of texts: {message!r:.80}")
    return [{"role": message["role"], "content": message["content"]} for message in value]


def _hh_dialogue(text: str, where: str) -> list[dict]:
    """'\\n\\nHuman: A\\n\\nAssistant: B ...' → [{user: A}, {assistant: B}, ...] (the text between two markers is one
    turn, stripped of the space after its marker)."""
    parts = HH_TURN.split(text)
    if parts[0].strip():
        raise RecipeError(f"{where}: text before the first '\\n\\nHuman:' turn: {parts[0]!r:.60}")
    turns = [
        {"role": HH_ROLES[speaker], "content": content.strip()} for speaker, content in zip(parts[1::2], parts[2::2])
    ]
    if not turns or turns[-1]["role"] != "assistant":
        raise RecipeError(f"{where}: the dialogue must end with an '\\n\\nAssistant:' turn")
    return turns


def _split_common_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen completion, rejected completion) of texts that start alike: the prompt is their common
    start cut back to a word boundary (TRL's `extract_prompt` cuts at the first differing character, which may split
    a word), the completions what follows, without the whitespace between."""
    length = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
    boundary = max((match.start() for match in re.finditer(r"\s", chosen[: length + 1])), default=0)
    return chosen[:boundary].rstrip(), chosen[boundary:].strip(), rejected[boundary:].strip()


def tokenize_pairs(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, source: str) -> Dataset:
    """Pairs in any of `PAIR_SHAPES` → `chosen_ids`/`rejected_ids` (`scored_token_ids` of each conversation).
    Errors name `source` (the file), the row (counted from 1, as the lines of a .jsonl file) and the column."""
    shape = pair_shape(dataset, source)
    if not tokenizer.chat_template:
        raise RecipeError("model_name_or_path: the tokenizer has no chat template, so conversations cannot be rendered")
    chosen_ids, rejected_ids = [], []
    for row_number, row in enumerate(dataset, start=1):
        chosen, rejected = _conversations(row, row_number, source, shape)
        chosen_ids.append(scored_token_ids(tokenizer, chosen))
        rejected_ids.append(scored_token_ids(tokenizer, rejected))
    return Dataset.from_dict({"chosen_ids": chosen_ids, "rejected_ids": rejected_ids})


def load_preference_pairs(
    data_args: PreferenceDataArguments, tokenizer: PreTrainedTokenizerBase, seed: int, max_length: int | None
) -> PairSplits:
    """Loads the pairs, holds out the test split (or `eval_fraction`), tokenises them and drops pairs with a side
    longer than `max_length` tokens (counted, as TRL would drop them silently)."""
    if not data_args.dataset_name:
        raise RecipeError(
            "dataset_name is not set: name the preference pairs (e.g. the folder scripts/build_preferences.py wrote)"
        )
    raw = load_raw_prompts(data_args, seed)
    limits = {"train": data_args.max_train_pairs, "eval": data_args.max_eval_pairs}
    splits, dropped = {}, {}
    for split, dataset in raw.items():
        if limits[split] is not None:
            dataset = dataset.select(range(min(limits[split], len(dataset))))
        tokenized = tokenize_pairs(dataset, tokenizer, _split_source(data_args, split))
        if max_length is not None:
            kept = tokenized.filter(
                lambda row: max(len(row["chosen_ids"]), len(row["rejected_ids"])) <= max_length
            )
            dropped[split], tokenized = len(tokenized) - len(kept), kept
        else:
            dropped[split] = 0
        if len(tokenized) == 0:
            raise RecipeError(
                f"dataset_name: no {split} pairs in '{data_args.dataset_name}' "
                f"({dropped[split]} dropped as longer than max_length={max_length})"
            )
        splits[split] = tokenized
    return PairSplits(train=splits["train"], eval=splits["eval"], dropped_too_long=dropped)


def _split_source(data_args: PreferenceDataArguments, split: str) -> str:
    """What errors about a split's rows name: the split's own file when the dataset is a folder with one file per
    split (as the preference builder writes, and as HH-RLHF is published), where rows are numbered as in the file;
    a local file whose validation share the kit drew (`eval_fraction`), whose rows are numbered in drawn order; or
    the dataset and its split."""
    path = Path(data_args.dataset_name)
    split_name = data_args.dataset_train_split if split == "train" else data_args.dataset_test_split
    if path.is_dir() and len(list(path.glob(f"{data_args.dataset_test_split}.*"))) == 1:
        files = list(path.glob(f"{split_name}.*"))
        if len(files) == 1:
            return f"dataset_name: {files[0]}"
    if path.exists():
        share = "training" if split == "train" else "validation"
        return f"dataset_name: {path} (its {share} share drawn by eval_fraction; rows counted in drawn order)"
    return f"dataset_name: '{data_args.dataset_name}' (split '{split_name}')"


def load_reward_base(model_args: RewardModelArguments, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """The model to train: a sequence classifier with one output. From a causal LM the score head is new (random);
    its `config.pad_token_id` is the tokenizer's, so the score is read at the last token that is not padding."""
    path = locate_model(model_args.model_name_or_path, "model_name_or_path")
    depth = {}
    if model_args.num_hidden_layers is not None:
        layers = getattr(AutoConfig.from_pretrained(path).get_text_config(), "num_hidden_layers", None)
        if layers is None or not 0 < model_args.num_hidden_layers <= layers:
            raise RecipeError(
                f"num_hidden_layers: {model_args.num_hidden_layers}; '{model_args.model_name_or_path}' has "
                f"{layers} layers: keep between 1 and {layers}"
            )
        depth = {"num_hidden_layers": model_args.num_hidden_layers}
    try:
        # TRL's filter for the expected load report of a causal LM read as a classifier (new score head, unused
        # LM head).
        with suppress_seqcls_warning():
            model = AutoModelForSequenceClassification.from_pretrained(
                path,
                num_labels=1,
                revision=model_args.model_revision,
                dtype=torch_dtype(model_args.dtype),
                attn_implementation=model_args.attn_implementation,
                **depth,
            )
    except (OSError, ValueError, RuntimeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RecipeError(
            f"model_name_or_path: cannot load '{model_args.model_name_or_path}' as a one-score classifier: {first_line}"
        ) from error
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def pair_metrics(model: PreTrainedModel, pairs: Dataset) -> PairMetrics:
    chosen = sequence_scores(model, pairs["chosen_ids"], model.config.pad_token_id)
    rejected = sequence_scores(model, pairs["rejected_ids"], model.config.pad_token_id)
    return PairMetrics(
        pairs=len(pairs),
        accuracy=(chosen > rejected).float().mean().item(),
        margin=(chosen - rejected).mean().item(),
        mean_score=torch.cat([chosen, rejected]).mean().item(),
    )


@torch.no_grad()
def _scored_hidden_states(model: PreTrainedModel, sequences: list[list[int]]) -> torch.Tensor:
    """The final hidden state the score head reads for each sequence (its last token): float32 [n, hidden]."""
    model.eval()
    states = [
        last_token_hidden_states(model, input_ids, attention_mask).float().cpu()
        for input_ids, attention_mask, _ in padded_batches(
            sequences, model.config.pad_token_id, SCORING_BATCH_SIZE, model.device
        )
    ]
    return torch.cat(states)


@torch.no_grad()
def normalize_score_head(model: PreTrainedModel, reference: list[list[int]], unit_std: bool) -> dict[str, float]:
    """Makes the mean score over the `reference` sequences 0 and, with `unit_std`, their standard deviation 1;
    returns what changed.

    Decoder classifiers in transformers have a score head without a bias (a bias would be dropped on loading),
    so no parameter adds a constant. Instead the head's weight w takes the smallest change that zeroes the
    reference mean: w ← w − m·h̄/‖h̄‖², with h̄ the mean scored hidden state and m the mean score. A text whose
    hidden state is h moves by −m·(h·h̄)/‖h̄‖²: exactly −m on average over the reference, about −m for any text
    when hidden states share a large common direction (as they do in language models); `shift_std` says how
    far from a uniform shift it is. Scaling is exact: w ← w / s multiplies every score by 1 / s."""
    head = getattr(model, "score", None)
    if not isinstance(head, torch.nn.Linear) or head.out_features != 1:
        raise RecipeError(
            f"center_rewards/normalize_rewards: {type(model).__name__} has no one-output `score` head to adjust"
        )
    hidden = _scored_hidden_states(model, reference)
    weight = head.weight[0].float()
    before = hidden @ weight
    mean_hidden = hidden.mean(dim=0)
    change = -before.mean() * mean_hidden / mean_hidden.dot(mean_hidden)
    shift = hidden @ change
    weight = weight + change
    scale = 1.0 / (hidden @ weight).std().item() if unit_std else 1.0
    head.weight[0] = (weight * scale).to(head.weight.dtype)
    after = hidden @ head.weight[0].float()
    return {
        "reference_sequences": len(reference),
        "reference_mean_score_before": before.mean().item(),
        "reference_std_score_before": before.std().item(),
        "reference_mean_score_after": after.mean().item(),
        "reference_std_score_after": after.std().item(),
        "shift_mean": shift.mean().item(),
        "shift_std": shift.std().item(),
        "scale": scale,
    }


def describe_batches(recipe: RewardRecipe, processes: int, train_pairs: int) -> str:
    """The batch arithmetic, as the config files write it in their comments."""
    training = recipe.training
    per_step = training.per_device_train_batch_size * training.gradient_accumulation_steps * processes
    batches = math.ceil(train_pairs / (training.per_device_train_batch_size * processes))
    steps_per_epoch = max(batches // training.gradient_accumulation_steps, 1)
    total = training.max_steps if training.max_steps > 0 else math.ceil(training.num_train_epochs * steps_per_epoch)
    return (
        f"{training.per_device_train_batch_size} pairs per device × {training.gradient_accumulation_steps} "
        f"accumulation × {processes} processes = {per_step} pairs ({2 * per_step} sequences) per optimizer step; "
        f"{train_pairs} pairs × {training.num_train_epochs:g} epochs → {total} steps"
    )


def _append_metrics(path: Path, step: int, logs: dict[str, float]) -> None:
    with path.open("a") as file:
        file.write(json.dumps({"step": step, **logs}) + "\n")


class KitRewardTrainer(RewardTrainer):
    """TRL's RewardTrainer, with an FSDP launch config honoured on CPU processes too (tests, CI): accelerate
    selects FSDP only on GPU-like devices (`recipes.ppo.distributed.fsdp_on_cpu`)."""

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if fsdp_on_cpu(self.accelerator):
            self.is_fsdp_enabled = True


def gathered_model(trainer: RewardTrainer, peft_config) -> PreTrainedModel | None:
    """The trained model, whole and unsharded, LoRA merged, on the main process's CPU (None on the others). Every
    process must call it: under ZeRO-3 and FSDP each holds only a shard, which are gathered first. The model is
    rebuilt from its config (outside any DeepSpeed partitioning) and given the gathered weights, so that what
    follows (normalising, scoring the validation pairs, saving) runs on the main process alone."""
    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if not trainer.accelerator.is_main_process:
        return None
    module = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    base = module.get_base_model() if is_peft_model(module) else module
    # Training is over: models made from here on are whole (transformers would otherwise create them under
    # ZeRO-3's partitioning, which needs every process to take part).
    unset_hf_deepspeed_config()
    model = AutoModelForSequenceClassification.from_config(base.config, dtype=base.dtype)
    if is_peft_model(module):
        model = get_peft_model(model, peft_config)
    missing, unexpected = model.load_state_dict({k: v.cpu() for k, v in state_dict.items()}, strict=False)
    trained_missing = [key for key in missing if "lora_" in key or key.endswith("score.weight")]
    if trained_missing or unexpected:
        raise RuntimeError(f"gathered reward model does not fit its config: missing {trained_missing}, unexpected {unexpected}")
    return (model.merge_and_unload() if is_peft_model(model) else model).eval()


def train_reward_model(recipe: RewardRecipe) -> RewardTrainingResult:
    """Trains, and saves to `output_dir` a folder that `AutoModelForSequenceClassification.from_pretrained`
    loads (one label, the kit's pad token, LoRA merged) with its tokenizer and chat template, plus
    `recipe.yaml` and `metrics.jsonl`. Validation accuracy and margin go to `metrics.jsonl` and W&B during
    training (TRL's `eval_*`) and, for the saved model, at the end (`final/*`)."""
    state = PartialState()
    data_args, model_args, training = recipe.data, recipe.model, recipe.training
    output_dir = check_output_dir(training.output_dir, training.overwrite_output_dir)

    tokenizer = load_tokenizer(model_args)
    pairs = load_preference_pairs(data_args, tokenizer, training.seed, training.max_length)
    reference = None
    if training.center_rewards or training.normalize_rewards:
        if training.center_rewards_reference:
            reference_pairs = tokenize_pairs(
                load_data_file(training.center_rewards_reference, "center_rewards_reference"), tokenizer,
                f"center_rewards_reference: {training.center_rewards_reference}",
            )
        else:
            reference_pairs = pairs.train
        # Each completion once, however many pairs it is in (a prompt's k completions make up to k(k-1)/2 pairs).
        sequences = list(reference_pairs["chosen_ids"]) + list(reference_pairs["rejected_ids"])
        reference = [list(ids) for ids in dict.fromkeys(map(tuple, sequences))]
    state.print(pairs.describe(training.max_length))
    state.print(f"batches: {describe_batches(recipe, state.num_processes, len(pairs.train))}")
    # The new score head is drawn from the global generator: seeded, the run is repeatable (TRL seeds only later).
    set_seed(training.seed)
    model = load_reward_base(model_args, tokenizer)
    peft_config = get_peft_config(model_args)
    layers = getattr(model.config.get_text_config(), "num_hidden_layers", "?")
    state.print(
        f"reward model: {model_args.model_name_or_path}, {layers} layers ({'LoRA' if peft_config else 'full'}), "
        f"score head trained in full; pad token {tokenizer.pad_token!r}"
    )
    # Every process has checked the input before the main one writes into the output folder.
    state.wait_for_everyone()

    wandb_on = "wandb" in (training.report_to or [])
    if state.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        recipe.save_yaml(output_dir / RESOLVED_RECIPE_FILE)
        (output_dir / METRICS_FILE).write_text("")
        if wandb_on:
            start_wandb_run(training.wandb_project, training.run_name, training.wandb_tags, recipe.to_dict())

    trainer = KitRewardTrainer(
        model=model,
        args=training,
        train_dataset=pairs.train,
        eval_dataset=pairs.eval,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[MetricsFileCallback(output_dir / METRICS_FILE)],
    )
    trainer.train()

    final_model, final_logs = gathered_model(trainer, peft_config), {}
    if state.is_main_process:
        final_model.config.pad_token_id = tokenizer.pad_token_id
        if reference is not None:
            centring = normalize_score_head(final_model, reference, unit_std=training.normalize_rewards)
            final_logs.update({f"centring/{name}": value for name, value in centring.items()})
        final_logs.update(pair_metrics(final_model, pairs.eval).as_logs("final/eval"))
        _append_metrics(output_dir / METRICS_FILE, trainer.state.global_step, final_logs)
        if wandb_on:
            import wandb

            wandb.log(final_logs)
            wandb.run.summary.update(final_logs)
        final_model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
        finish_wandb_run()
        state.print(
            f"validation ({len(pairs.eval)} pairs): accuracy {final_logs['final/eval/accuracy']:.3f}, mean margin "
            f"{final_logs['final/eval/margin']:.3f}; saved the reward model, {RESOLVED_RECIPE_FILE} and "
            f"{METRICS_FILE} to {output_dir}"
        )
    state.wait_for_everyone()
    return RewardTrainingResult(output_dir, final_model, tokenizer, final_logs)
