"""PPO end to end, in this process, on the tiny models: one run per way of holding the policy and its reference.
Each run is 1–2 updates of 4 episodes; the checks are on what a run leaves behind."""

import copy
import dataclasses
import math
from pathlib import Path

import pytest
import torch
from conftest import all_fields, read_metrics, tiny_recipe_flags

from peft import AutoPeftModelForCausalLM, PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from recipes import parse_recipe, run_ppo

EPISODES_PER_UPDATE = 4  # configs/tiny/ppo.yaml: 4 per device × 1 accumulation × 1 process
TRL_METRICS = {
    "objective/kl",
    "objective/entropy",
    "objective/non_score_reward",
    "objective/rlhf_reward",
    "objective/scores",
    "policy/approxkl_avg",
    "policy/clipfrac_avg",
    "loss/policy_avg",
    "loss/value_avg",
    "val/clipfrac_avg",
    "val/ratio",
    "episode",
    "lr",
}


@dataclasses.dataclass
class Case:
    flags: list[str]
    total_episodes: int
    lora: bool
    reference: str  # as the run's log names it
    prompts: str = "jsonl"  # which prompt file of the `prompt_files` fixture
    value_head: bool = False  # value_model_init: policy_trunk
    evaluated: bool = False  # eval_every_updates: 1


CASES = {
    "lora_shared_reference": Case(["--use_peft", "true", "--reference", "adapter_disabled"], 8, True,
                                  "adapter_disabled"),
    "lora_4bit_reference": Case(["--reference", "separate", "--ref_quantization", "4bit"], 4, True, "separate"),
    # Chat-message prompts (rendered with the chat template) instead of plain prompts as user turns.
    "lora_8bit_reference": Case(["--reference", "separate", "--ref_quantization", "8bit",
                                 "--prompt_as_user_message", "false"], 4, True, "separate", prompts="messages"),
    # Plain prompts continued as they are (no chat template).
    "full_finetune_reference_copy": Case(["--use_peft", "false", "--prompt_as_user_message", "false"], 4, False,
                                         "separate"),
    "qlora": Case(["--use_peft", "true", "--load_in_4bit", "true"], 4, True, "adapter_disabled"),
    # The default SmolLM2 recipe's shape: bf16 weights, a value head on the policy, a held-out evaluation.
    # ... and TRL's sample table of greedy completions, twice in the run.
    "bf16_value_head_evaluated": Case(["--dtype", "bfloat16", "--value_model_init", "policy_trunk",
                                       "--eval_every_updates", "1", "--eval_reward_functions", "sentiment",
                                       "--num_sample_generations", "2"], 8, True, "adapter_disabled", value_head=True,
                                      evaluated=True),
}  # fmt: skip


def changed_tensors(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    common = before.keys() & after.keys()
    assert common, "no tensor names in common"
    return [name for name in common if not torch.equal(before[name], after[name])]


def generates(model, tokenizer, new_tokens: int = 4) -> None:
    inputs = tokenizer(["The movie was"], return_tensors="pt")
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    assert output.shape == (1, inputs["input_ids"].shape[1] + new_tokens)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_ppo_run(case: Case, tiny_models, prompt_files, tmp_path, capsys):
    output_dir = tmp_path / "run"
    recipe = parse_recipe(
        tiny_recipe_flags(
            tiny_models, prompt_files[case.prompts], output_dir, "--total_episodes", str(case.total_episodes),
            *case.flags,
        )
    )  # fmt: skip
    # TRL's trainer fills in derived fields of the training arguments (batch_size, ...) as it starts: compare the
    # saved recipe with the recipe as parsed.
    parsed_dict, parsed_fields = recipe.to_dict(), copy.deepcopy(all_fields(recipe))
    assert run_ppo(recipe) == output_dir
    updates = math.ceil(case.total_episodes / EPISODES_PER_UPDATE)

    log = capsys.readouterr().out
    assert (
        f"× 1 processes = {EPISODES_PER_UPDATE} episodes per update; 2 mini-batches of 2 episodes (1 micro-batch of 2 "
        f"per process); 1 PPO epochs → 2 optimizer steps per update; {case.total_episodes} episodes → {updates} updates"
    ) in log
    assert f"({'LoRA' if case.lora else 'full'}), reference {case.reference}," in log
    # TRL's sample table (num_sample_generations): printed before the updates it falls on.
    shown = [line for line in log.splitlines() if line.startswith("samples after update")]
    assert len(shown) == (2 if case.evaluated else 0)

    # metrics.jsonl: one line per update, TRL's metric names, finite values, episodes counted per update.
    metrics = read_metrics(output_dir / "metrics.jsonl")
    assert len(metrics) == updates
    for update, line in enumerate(metrics, start=1):
        assert TRL_METRICS <= line.keys()
        assert line["episode"] == update * EPISODES_PER_UPDATE
        assert all(math.isfinite(value) for value in line.values() if isinstance(value, (int, float)))

    # recipe.yaml: re-parses to the same run.
    again = parse_recipe(["--config", str(output_dir / "recipe.yaml")])
    assert again.to_dict() == parsed_dict
    assert all_fields(again) == parsed_fields

    # The tokenizer, saved with the policy, pads with a token that is not EOS.
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id

    # The policy: a trained LoRA adapter on the tiny base, or full weights that changed.
    if case.lora:
        assert (output_dir / "adapter_config.json").is_file()
        assert not (output_dir / "model.safetensors").exists()
        adapter = load_file(output_dir / "adapter_model.safetensors")
        lora_b = {name: tensor for name, tensor in adapter.items() if "lora_B" in name}
        assert {name.split(".")[-3] for name in lora_b} == {"q_proj", "v_proj"}
        # LoRA B starts at zero: any non-zero entry is a trained update.
        assert any(tensor.abs().sum() > 0 for tensor in lora_b.values())
        policy = AutoPeftModelForCausalLM.from_pretrained(output_dir)
        assert isinstance(policy, PeftModel)
        assert Path(policy.peft_config["default"].base_model_name_or_path) == tiny_models["policy"]
    else:
        assert not (output_dir / "adapter_config.json").exists()
        trained = load_file(output_dir / "model.safetensors")
        assert changed_tensors(load_file(tiny_models["policy"] / "model.safetensors"), trained)
        policy = AutoModelForCausalLM.from_pretrained(output_dir)
    generates(policy, tokenizer)

    # The held-out evaluation after each update: the PPO reward and the gold function, KL, win-rate.
    for line in metrics:
        keys = {"eval/reward/reward_model/mean", "eval/reward/sentiment/mean", "eval/kl/k1/mean",
                "eval/win_rate/sentiment"}
        assert keys <= line.keys() if case.evaluated else not any(key.startswith("eval/") for key in line)
        if case.evaluated:
            assert line["eval/num_prompts"] == 2 and line["time/evaluation_s"] > 0  # the held-out split

    value_dir = output_dir / "value_model"
    if case.value_head:  # a linear head on the policy's last hidden state, trained from zero
        head = load_file(value_dir / "value_head.safetensors")
        assert head["score.weight"].shape == (1, policy.config.hidden_size)
        assert head["score.weight"].abs().sum() > 0
        return
    # The value model: a one-label classifier, trained from the reward model.
    value = AutoModelForSequenceClassification.from_pretrained(value_dir)
    assert value.config.num_labels == 1
    assert (value_dir / "tokenizer.json").is_file()
    assert changed_tensors(
        load_file(tiny_models["reward"] / "model.safetensors"), load_file(value_dir / "model.safetensors")
    )
