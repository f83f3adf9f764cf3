"""The memory planner on cases small enough to check by hand: parameter counts against the models transformers and
peft build, weight bytes = parameters × bytes exactly, the LoRA formula, the activations autograd saves against a
real forward, each phase's terms, sharding, the CPU allocator's kept heap, and the CLI's exit codes. (How close its
figures come to measured runs: bench/plan_vs_measured.py, docs/memory.md.)"""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from recipes.errors import RecipeError
from recipes.planner import (
    DEEPSPEED_OPTIMIZER_BYTES,
    DEEPSPEED_REDUCE_BUCKET,
    GIB,
    GPU_RUNTIME_GIB,
    QUANT_BLOCK,
    SCORING_FP32_COPIES,
    TRAINING_LOGITS_COPIES,
    Architecture,
    Hardware,
    Parallelism,
    PlanRequest,
    as_dict,
    cheapest_fixes,
    check_fit,
    load_architecture,
    load_hardware,
    parallelism_from_accelerate,
    plan_memory,
)
from recipes.ppo.model import PolicyAndValue, ValueHead
from recipes.tiny_models import tiny_llama_config

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = str(REPO_ROOT / "configs" / "tiny" / "ppo.yaml")
MODEL_CONFIGS = sorted((REPO_ROOT / "configs" / "model_configs").glob("*/*/config.json"))

# The tiny Llama of recipes.tiny_models with a small vocabulary, so that every number below is easy to recompute:
# hidden 64, intermediate 128, 2 layers, 4 heads of 16, 2 key-value heads (kv_dim 32), tied embeddings.
VOCAB = 1000
H, I, LAYERS, Q, KV, HEADS = 64, 128, 2, 64, 32, 4
LINEAR_PER_LAYER = H * Q + 2 * H * KV + Q * H + 3 * H * I  # q, k, v, o, gate, up, down
CAUSAL_PARAMS = VOCAB * H + LAYERS * (LINEAR_PER_LAYER + 2 * H) + H  # embedding, layers (+2 norms), final norm
CLASSIFIER_PARAMS = CAUSAL_PARAMS + H  # + a one-label score head, no bias


def plan_script():
    spec = importlib.util.spec_from_file_location("plan_script", REPO_ROOT / "scripts" / "plan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_config_folders(tmp_path_factory) -> dict[str, Path]:
    """config.json only (the planner reads nothing else): a tiny causal LM and a tiny one-label classifier."""
    root = tmp_path_factory.mktemp("planner_models")
    folders = {}
    for role, overrides in {"policy": {}, "reward": {"num_labels": 1}}.items():
        folder = root / role
        folder.mkdir()
        tiny_llama_config(VOCAB, **overrides).save_pretrained(folder)
        folders[role] = folder
    return folders


def tiny_request(folders, *flags, hardware=None, accelerate_config=None) -> PlanRequest:
    args = ["--config", TINY_RECIPE, "--model_name_or_path", str(folders["policy"]),
            "--reward_model_name_or_path", str(folders["reward"]), *flags]  # fmt: skip
    return PlanRequest(args, hardware, accelerate_config)


def single_gpu() -> Parallelism:
    return Parallelism("none", 1, 1, "gpu", "test")


def single_cpu() -> Parallelism:
    return Parallelism("none", 1, 1, "cpu", "test")


def plan_of(folders, *flags, parallel=None):
    request = tiny_request(folders, *flags)
    return as_dict(plan_memory(request.parse(), parallel or single_gpu()))


def test_hand_counted_parameters(tiny_config_folders):
    arch, _ = load_architecture(str(tiny_config_folders["policy"]), "model_name_or_path")
    assert (arch.hidden_size, arch.q_dim, arch.kv_dim, arch.num_layers) == (H, Q, KV, LAYERS)
    assert arch.params("lm") == CAUSAL_PARAMS
    assert arch.params("score") == CLASSIFIER_PARAMS


@pytest.mark.parametrize("config_file", MODEL_CONFIGS, ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}")
def test_parameter_counts_match_the_models_transformers_builds(config_file):
    """Each architecture file of configs/model_configs/, counted by the planner and by a model built on the meta
    device (no memory) from the same config.json: causal LM and one-label classifier."""
    config = AutoConfig.for_model(**json.loads(config_file.read_text()))
    arch = Architecture.from_config(json.loads(config_file.read_text()), str(config_file))
    with torch.device("meta"):
        causal = AutoModelForCausalLM.from_config(config)
        config.num_labels = 1
        classifier = AutoModelForSequenceClassification.from_config(config)
    assert arch.params("lm") == sum(p.numel() for p in causal.parameters())
    assert arch.params("score") == sum(p.numel() for p in classifier.parameters())


def test_lora_parameters_match_peft(tiny_config_folders):
    arch, _ = load_architecture(str(tiny_config_folders["policy"]), "model_name_or_path")
    r = 8
    assert arch.lora_params(["q_proj", "v_proj"], r) == LAYERS * (r * (H + Q) + r * (H + KV)) == 3584
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_config_folders["policy"]))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=16, target_modules=targets))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert arch.lora_params(targets, 16) == trainable


def test_weight_bytes_are_parameters_times_bytes(tiny_config_folders):
    """fp32 and bf16, LoRA adapters (fp32) on top; no reference model with the adapter disabled."""
    lora = LAYERS * (8 * (H + Q) + 8 * (H + KV))  # the tiny recipe: r=8 on q_proj, v_proj
    for dtype, size in (("float32", 4), ("bfloat16", 2)):
        plan = plan_of(tiny_config_folders, "--dtype", dtype)
        models = {m["role"]: m for m in plan["models"]}
        assert set(models) == {"policy", "value", "reward"}  # reference: auto with LoRA → adapter disabled
        assert models["policy"]["weight_bytes"] == CAUSAL_PARAMS * size + lora * 4
        assert models["reward"]["weight_bytes"] == CLASSIFIER_PARAMS * size
        assert models["value"]["weight_bytes"] == CLASSIFIER_PARAMS * size  # trained in full
        assert models["value"]["trainable_params"] == CLASSIFIER_PARAMS
        assert plan["static"][f"value AdamW states ({2 * size} B/param)"] == CLASSIFIER_PARAMS * 2 * size
        assert plan["static"]["policy AdamW states (8 B/param)"] == lora * 8


def test_quantized_weight_bytes(tiny_config_folders):
    """nf4: half a byte per linear weight + one fp32 absmax per 64 weights; 8-bit: a byte + one fp32 scale per output
    row; the rest (embedding, norms) in the recipe's dtype."""
    linear = LAYERS * LINEAR_PER_LAYER
    rest = CLASSIFIER_PARAMS - linear
    four = plan_of(tiny_config_folders, "--reward_quantization", "4bit")
    reward = next(m for m in four["models"] if m["role"] == "reward")
    assert reward["weight_bytes"] == linear // 2 + math.ceil(linear / QUANT_BLOCK) * 4 + rest * 4
    eight = plan_of(tiny_config_folders, "--reward_quantization", "8bit")
    reward = next(m for m in eight["models"] if m["role"] == "reward")
    out_rows = LAYERS * (Q + 2 * KV + H + 2 * I + H)
    assert reward["weight_bytes"] == linear + out_rows * 4 + rest * 4


def test_separate_reference_and_full_fine_tuning(tiny_config_folders):
    plan = plan_of(tiny_config_folders, "--use_peft", "false")
    models = {m["role"]: m for m in plan["models"]}
    assert models["reference"]["weight_bytes"] == CAUSAL_PARAMS * 4
    assert models["policy"]["trainable_params"] == CAUSAL_PARAMS


def test_sharding(tiny_config_folders):
    """ZeRO-2 shards optimizer states (12 bytes per trainable parameter under DeepSpeed); ZeRO-3 also every model's
    weights; FSDP the policy's and value model's weights only."""
    n = 8
    zero2 = plan_of(tiny_config_folders, parallel=Parallelism("zero2", n, n, "gpu", "test"))
    assert zero2["static"]["value AdamW states (12 B/param) (1/8)"] == math.ceil(
        CLASSIFIER_PARAMS * DEEPSPEED_OPTIMIZER_BYTES / n
    )
    assert zero2["static"]["reward weights"] == CLASSIFIER_PARAMS * 4
    zero3 = plan_of(tiny_config_folders, parallel=Parallelism("zero3", n, n, "gpu", "test"))
    assert zero3["static"]["reward weights (1/8)"] == math.ceil(CLASSIFIER_PARAMS * 4 / n)
    assert "policy + value weights gathered for sampling" in zero3["phases"]["generation"]
    # DeepSpeed's default gradient bucket, allocated whole on a GPU.
    assert zero3["static"]["DeepSpeed gradient bucket (5e+08 elements)"] == DEEPSPEED_REDUCE_BUCKET * 4
    fsdp = plan_of(tiny_config_folders, parallel=Parallelism("fsdp", n, n, "gpu", "test"))
    assert fsdp["static"]["reward weights"] == CLASSIFIER_PARAMS * 4
    assert fsdp["static"]["value weights (1/8)"] == math.ceil(CLASSIFIER_PARAMS * 4 / n)
    assert zero3["peak_bytes"] < zero2["peak_bytes"]


def test_backends_as_the_engine_meets_them(tiny_config_folders):
    """ZeRO-3 holds every model in the launch's precision (fp32 without bf16), and gathers a model below DeepSpeed's
    live-parameter limit whole; FSDP gathers the root unit of the trained module (embeddings, final norms, heads)
    and a decoder layer with the next one prefetched (PolicyAndValue declares its models' layers as units); on CPU
    processes DDP's first broadcast and FSDP's unsharded load stay in the heap."""
    lora = LAYERS * (8 * (H + Q) + 8 * (H + KV))
    trained = CAUSAL_PARAMS * 4 + lora * 4 + CLASSIFIER_PARAMS * 4  # the tiny recipe: fp32 policy, critic in full
    zero3 = plan_of(tiny_config_folders, "--dtype", "bfloat16", parallel=Parallelism("zero3", 2, 2, "gpu", "test"))
    assert {m["role"]: m["dtype"] for m in zero3["models"]} == {"policy": "float32", "value": "float32",
                                                                "reward": "float32"}  # fmt: skip
    label = "policy + value weights gathered (layers, or all below DeepSpeed's live limit)"
    assert zero3["phases"]["optimisation"][label] == trained
    assert zero3["phases"]["scoring"]["reward weights gathered"] == CLASSIFIER_PARAMS * 4
    fsdp = plan_of(tiny_config_folders, parallel=Parallelism("fsdp", 2, 2, "gpu", "test"))
    root = (2 * (VOCAB * H + H) + H) * 4  # two fp32 embeddings (the policy's head tied) and final norms, the score
    largest_layer = (CAUSAL_PARAMS * 4 + lora * 4 - (VOCAB * H + H) * 4) // LAYERS
    label = "policy + value weights gathered (the root unit, and a layer with the next prefetched)"
    for phase in ("generation", "scoring", "optimisation"):
        assert fsdp["phases"][phase][label] == root + 2 * largest_layer
    ddp_cpu = plan_of(tiny_config_folders, parallel=Parallelism("ddp", 2, 2, "cpu", "test"))
    assert ddp_cpu["static"]["copies of DDP's first broadcast of the weights, kept by the allocator"] == trained
    fsdp_cpu = plan_of(tiny_config_folders, parallel=Parallelism("fsdp", 2, 2, "cpu", "test"))
    assert fsdp_cpu["static"]["whole weights loaded before sharding, kept by the allocator"] == trained


def tiny_lora_bytes_per_token(seq: int) -> int:
    """The tiny recipe's policy (fp32, LoRA r=8 on q_proj and v_proj), per token per layer, by hand: the RMSNorms'
    fp32 inputs, SDPA's q, k, v (repeated to 4 heads), output and log-sum-exp, the float mask, SwiGLU's gate, SiLU
    and up, the input q_proj and v_proj share, lora_A's outputs."""
    return 2 * H * 4 + 4 * Q * 4 + HEADS * 4 + seq * 4 + 3 * I * 4 + H * 4 + 2 * 8 * 4


def test_activations_and_phase_terms(tiny_config_folders):
    """The tiny recipe: 4 episodes per update, mini-batches of 2 (micro-batch 2), 64 + 8 tokens, fp32; its critic
    is the reward model's architecture trained in full."""
    plan = plan_of(tiny_config_folders)
    seq, micro, response, chunk = 72, 2, 8, 4
    training = plan["phases"]["optimisation"]
    policy_layer = tiny_lora_bytes_per_token(seq)
    # With a frozen base the first layer's first norm keeps nothing; the final norm keeps its fp32 input.
    assert training["policy activations (2 seqs × 72 tokens)"] == micro * seq * LAYERS * policy_layer
    # Full fine-tuning also keeps the norms' outputs before their weights and the inputs of q/k/v, gate/up, down.
    value_layer = 2 * H * 4 + 4 * Q * 4 + HEADS * 4 + seq * 4 + 3 * I * 4 + 2 * H * 4 + (2 * H + I) * 4
    assert training["value activations (2 seqs × 72 tokens)"] == micro * seq * (LAYERS * value_layer + H * 4)
    logits = f"policy logits at the response positions, fp32 ×{TRAINING_LOGITS_COPIES} [2, 8, {VOCAB}]"
    assert training[logits] == TRAINING_LOGITS_COPIES * micro * response * VOCAB * 4
    assert training["gradients"] == (LAYERS * (8 * (H + Q) + 8 * (H + KV)) + CLASSIFIER_PARAMS) * 4

    generation = plan["phases"]["generation"]
    assert generation == {"KV cache [4 seqs × 72 tokens]": 2 * LAYERS * KV * chunk * seq * 4}  # no sampler logits
    scoring = plan["phases"]["scoring"]
    assert scoring[f"policy logits at the response positions, fp32 [4, 9, {VOCAB}]"] == chunk * 9 * VOCAB * 4
    assert scoring[f"reference logits at the response positions, fp32 [4, 9, {VOCAB}]"] == chunk * 9 * VOCAB * 4
    fp32 = f"temperature-scaled copy and log-softmax temporaries, fp32 ×{SCORING_FP32_COPIES} [4, 8, {VOCAB}]"
    assert scoring[fp32] == SCORING_FP32_COPIES * chunk * response * VOCAB * 4
    assert "evaluation" not in plan["phases"]  # eval_every_updates: 0

    checkpointed = plan_of(tiny_config_folders, "--activation_checkpointing", "true")["phases"]["optimisation"]
    kept = micro * seq * (LAYERS * H * 4 + policy_layer + H * 4)
    assert checkpointed["policy activations (2 seqs × 72 tokens, checkpointed)"] == kept
    assert plan["static"]["CUDA context and libraries"] == int(GPU_RUNTIME_GIB * GIB)
    assert set(plan["phases"]) <= {"generation", "scoring", "optimisation", "evaluation"}  # the run's phase names


def test_evaluation_phase(tiny_config_folders):
    plan = plan_of(tiny_config_folders, "--eval_every_updates", "1", "--per_device_eval_batch_size", "3")
    evaluation = plan["phases"]["evaluation"]
    # Reading one model's log-probs outweighs sampling's KV cache here.
    assert evaluation[f"one model's logits at the response positions, fp32 [3, 9, {VOCAB}]"] == 3 * 9 * VOCAB * 4


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize(
    "dtype, lora_targets, autocast",
    [("float32", ["q_proj", "v_proj"], False), ("bfloat16", ALL_LINEAR, False), ("bfloat16", ALL_LINEAR, True),
     ("bfloat16", None, False)],
    ids=["fp32-lora-qv", "bf16-lora-all-linear", "bf16-lora-all-linear-autocast", "bf16-full"],
)  # fmt: skip
def test_saved_activations_match_autograd(dtype, lora_targets, autocast):
    """The planner's bytes per token per layer against what autograd saves in the decoder layers of a real training
    forward of the engine's PolicyAndValue (tiny Llama, peft LoRA with its fp32 adapters, padded rows; with bf16
    autocast as accelerate runs the GPU recipes, on the CPU's autocast, whose casts of the adapters' weights are
    per call and not per token, so they are left out)."""
    torch.manual_seed(0)
    config = tiny_llama_config(VOCAB)
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
    if lora_targets:
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=lora_targets))
    engine = PolicyAndValue(model, ValueHead(H)).train()
    rows, response, pad = 3, 6, VOCAB - 1
    query_responses = torch.randint(1, VOCAB - 2, (rows, 10 + response))
    query_responses[:2, :3] = pad  # left padding: an attention mask reaches SDPA

    layers = model.get_base_model().model.layers if lora_targets else model.model.layers
    inside, shared, saved = [False], set(), {}

    def enter(layer, args, kwargs):
        inside[0] = True
        for value in kwargs.values():  # the mask and position embeddings, made once for every layer
            for tensor in value if isinstance(value, tuple) else (value,):
                if isinstance(tensor, torch.Tensor):
                    shared.add(tensor.untyped_storage().data_ptr())

    for layer in layers:
        layer.register_forward_pre_hook(enter, with_kwargs=True)
        layer.register_forward_hook(lambda *_: inside.__setitem__(0, False))
    parameters = {p.untyped_storage().data_ptr() for p in engine.parameters()}
    weight_shapes = {shape for p in engine.parameters() for shape in (tuple(p.shape), tuple(p.shape)[::-1])}

    def pack(tensor):
        key = tensor.untyped_storage().data_ptr()
        weight_copy = autocast and tuple(tensor.shape) in weight_shapes
        if inside[0] and key not in parameters and key not in shared and not weight_copy:
            saved[key] = tensor.untyped_storage().nbytes()
        return tensor

    precision = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    with precision, torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        engine(query_responses, pad, response)
    per_token = sum(saved.values()) / query_responses.numel()

    arch = Architecture.from_config(config.to_dict(), "tiny")
    expected = arch.trunk_saved_bytes_per_token(
        4 if dtype == "float32" else 2, query_responses.shape[1], "lora" if lora_targets else "full",
        lora_targets or (), 8, adapter_copy_bytes=(2 if autocast else 4) if dtype != "float32" and lora_targets else 0,
    )  # fmt: skip
    assert per_token == pytest.approx(expected - H * 4, rel=0.02)  # the final norm is outside the layers


def test_cpu_terms(tiny_config_folders):
    """On CPU processes each phase carries the heap the other phases left, kept by glibc's allocator; single
    allocations above its mmap threshold go back."""
    assert not any(plan_of(tiny_config_folders, "--dtype", "bfloat16")["kept"].values())  # a GPU keeps nothing

    plan = plan_memory(tiny_request(tiny_config_folders).parse(), single_cpu())
    heaps = {phase: plan.heap_bytes(phase) for phase in plan.phases}
    for phase in plan.phases:
        # Every piece here is below 32 MiB: all of it stays on the heap.
        assert heaps[phase] == sum(item.size for item in plan.phases[phase])
        assert plan.kept_bytes(phase) == sum(heaps.values()) - heaps[phase]
        assert plan.phase_bytes(phase) == plan.static_bytes + sum(heaps.values())
    # Scoring's logits of 4 × 3000 × 1000 values in fp32 (46 MiB a tensor) are mapped, given back when freed.
    large = plan_memory(tiny_request(tiny_config_folders, "--response_length", "3000").parse(), single_cpu())
    assert [item.returned == item.size for item in large.phases["scoring"]] == [True, True, True]
    assert large.heap_bytes("scoring") == 0
    assert large.kept_bytes("generation") == large.heap_bytes("optimisation")


def test_a_value_head_on_the_policy_trunk_removes_the_value_model(tiny_config_folders):
    separate = plan_of(tiny_config_folders)
    head = plan_of(tiny_config_folders, "--value_model_init", "policy_trunk")
    assert [m["role"] for m in head["models"]] == ["policy", "reward"]
    assert not any(label.startswith("value") for label in head["static"])
    policy_adam = lambda plan: plan["static"]["policy AdamW states (8 B/param)"]
    assert policy_adam(head) - policy_adam(separate) == (H + 1) * 8  # the head's two fp32 moments
    assert head["peak_bytes"] < separate["peak_bytes"] - CLASSIFIER_PARAMS * 4 * 3  # weights, gradients, moments


def test_fixes_are_the_cheapest_that_fit(tiny_config_folders):
    request = tiny_request(tiny_config_folders, "--use_peft", "true", "--reference", "separate")
    plan = plan_memory(request.parse(), single_gpu())
    # Declare a GPU just too small for the plan, and large enough without the second policy copy.
    reference = next(m for m in plan.models if m.role == "reference").weight_bytes()
    needed = (plan.peak_bytes - reference / 2) / 0.9 / GIB
    request.hardware = Hardware("gpu", needed, 1, 1, "configs/accelerate/single_gpu.yaml")
    assert not check_fit(plan, request.hardware).fits
    fixes = cheapest_fixes(request)
    assert fixes and all(len(option) == 1 for option in fixes)
    assert fixes[0][0].flags == ("--reference", "adapter_disabled")


def test_accelerate_configs_map_to_sharding():
    expected = {
        "cpu.yaml": ("none", 1, "cpu"),
        "multi_cpu.yaml": ("ddp", 2, "cpu"),
        "single_gpu.yaml": ("none", 1, "gpu"),
        "multi_gpu.yaml": ("ddp", 8, "gpu"),
        "deepspeed_zero2.yaml": ("zero2", 8, "gpu"),
        "deepspeed_zero3.yaml": ("zero3", 8, "gpu"),
        "fsdp.yaml": ("fsdp", 8, "gpu"),
        "multi_node_zero3.yaml": ("zero3", 16, "gpu"),
        "multi_node_fsdp.yaml": ("fsdp", 16, "gpu"),
    }
    for name, (strategy, processes, device) in expected.items():
        parallel = parallelism_from_accelerate(f"configs/accelerate/{name}")
        assert (parallel.strategy, parallel.processes, parallel.device) == (strategy, processes, device), name


def test_hardware_file_is_strict(tmp_path):
    recipe = tmp_path / "ppo.yaml"
    (tmp_path / "hardware.yaml").write_text("ppo.yaml: {gpu_memory_gb: 24, gpus: 1, accelerate_config: x.yaml}\n")
    with pytest.raises(RecipeError, match="unknown key.*gpus"):
        load_hardware(str(recipe))
    (tmp_path / "hardware.yaml").write_text("other.yaml: {gpu_memory_gb: 24, accelerate_config: x.yaml}\n")
    assert load_hardware(str(recipe)) is None


def test_unknown_model_names_what_to_add():
    with pytest.raises(RecipeError, match="configs/model_configs/some-org/some-model/config.json"):
        load_architecture("some-org/some-model", "model_name_or_path")
    with pytest.raises(RecipeError, match="neither a model folder nor the output_dir"):
        load_architecture("outputs/nothing/here", "reward_model_name_or_path")


def test_plan_script_exit_codes(tmp_path, capsys):
    plan = plan_script()
    fits = plan.main(["--config", "configs/smollm2-135m/ppo.yaml"])
    out = capsys.readouterr().out
    assert fits == plan.FITS and "fits" in out and "peak per device" in out

    too_small = tmp_path / "hardware.yaml"
    too_small.write_text("device: gpu\ngpu_memory_gb: 20\naccelerate_config: configs/accelerate/single_gpu.yaml\n")
    code = plan.main(["--config", "configs/qwen2.5-1.5b/ppo.yaml", "--hardware", str(too_small),
                      "--activation_checkpointing", "false"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == plan.DOES_NOT_FIT
    assert "does NOT fit" in out and "--activation_checkpointing true" in out

    with pytest.raises(RecipeError):
        plan.main(["--config", "configs/qwen2.5-1.5b/ppo.yaml", "--no_such_field", "1"])


def test_plan_script_plans_a_gpu_launch_config_on_cpu_processes(tiny_config_folders, capsys):
    """`--device cpu`: fsdp.yaml started on a machine without GPUs, as the launch tests start it."""
    code = plan_script().main(["--config", TINY_RECIPE, "--model_name_or_path", str(tiny_config_folders["policy"]),
                               "--reward_model_name_or_path", str(tiny_config_folders["reward"]),
                               "--accelerate_config", "configs/accelerate/fsdp.yaml", "--num_processes", "2",
                               "--device", "cpu"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "2 cpu process(es), FSDP, shards over 2" in out
    assert "CPU_RUNTIME_GIB" in out and "CUDA context" not in out
