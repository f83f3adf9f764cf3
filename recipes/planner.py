"""Memory per device of a PPO recipe, from the models' architectures alone (nothing is loaded), compared with the
hardware the recipe declares, with the cheapest changes that make it fit when it does not.

    python scripts/plan.py --config configs/<model>/ppo.yaml [--accelerate_config ...] [--hardware ...]

What the kit's engine (recipes/ppo/trainer.py) holds on each device, and how this module counts it:

- Held all run: the weights of the models (policy with its LoRA adapters and, by default, a value head on its trunk;
  a separate reference only when the LoRA policy with its adapter disabled is not the reference; a separate critic
  only when `value_model_init` is not `policy_trunk`; the reward model) at their dtype: 4-bit nf4 linears take 0.5
  byte per parameter plus one fp32 absmax per 64-value block, 8-bit linears 1 byte plus one fp32 scale per output
  row; embeddings, norms, biases and heads stay at the recipe's dtype. LoRA adapters are fp32 (peft upcasts them).
  AdamW's two moments per trainable parameter at its dtype (torch's AdamW); under DeepSpeed an fp32 master copy and
  fp32 moments (12 bytes per parameter), plus its gradient bucket. The process's runtime (CUDA context on a GPU; the
  Python process with torch, transformers and the kit imported on a CPU).
- Sharding over the processes: ZeRO-2 shards optimizer states and gradients; ZeRO-3 also every model's weights (the
  frozen reference and reward models go through DeepSpeed's inference engine); FSDP shards the trained module (policy
  and critic, frozen base weights included) only, the reference and reward models sit whole on every device.
- The phases of an update, named as the run logs them (`memory/<phase>_peak_gib`, recipes/tracking.py), each counted
  at its largest moment on top of what is held all run:
  generation (the KV cache of `local_rollout_forward_batch_size` sequences; nothing of the sampler's logits is
  kept), scoring (the policy's logits at the response positions, still referenced while the reference's are computed,
  and the fp32 log-softmax of one of them; log-probs come from the same forward as training's), optimisation (one
  micro-batch: the activations autograd saves for the backward pass, the policy's fp32 logits at the response
  positions, the gradients, the copy of the trainable state that lets a non-finite update be undone) and, when the
  recipe evaluates during the run, evaluation (sampling and one model's log-probs at `per_device_eval_batch_size`).
- On a CPU the resident set is what is measured, and two things of the runtime show in it: glibc's allocator keeps
  memory a phase frees for reuse (only single allocations above its mmap threshold go back to the system), so after
  the first update every phase starts from the largest heap any phase used; and torch's CPU matmul in 16 bits, given
  the sliced hidden states the LM head reads (`logits_to_keep`), copies the LM head's weight once per sequence.

bench/plan_vs_measured.py compares these figures with the peaks a CPU run logs; docs/memory.md has the table.
"""

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from recipes.config import Recipe, parse_recipe
from recipes.errors import RecipeError
from recipes.model_cache import resolve_model_path
from recipes.models import policy_quantization, reference_mode

KIT_ROOT = Path(__file__).resolve().parents[1]
MODEL_CONFIGS_DIR = KIT_ROOT / "configs" / "model_configs"
GIB = 2**30

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# --- Constants of the estimate (each one an assumption, stated) ---------------------------------------------------
GPU_RUNTIME_GIB = 0.8
"""CUDA context, cuBLAS/cuDNN workspaces and loaded kernels of one process: 0.5–1 GiB on current GPUs (outside what
`torch.cuda.max_memory_allocated` counts, which the run logs)."""
COLLECTIVES_GIB = 0.5
"""NCCL communicators and their buffers, once a process group of more than one GPU exists."""
CPU_RUNTIME_GIB = 0.56
"""What a CPU run's process holds besides its models and their work: the imports (torch, transformers, peft,
accelerate, DeepSpeed when installed, datasets, the kit: 0.47 GiB, bench/plan_vs_measured.py's import-only child),
the tokenizer and the prompts, and what the first forward leaves (torch's thread pool, oneDNN's kernels). Measured as
the tiny recipe's peak on one process less the planner's model terms for it (bench/plan_vs_measured.py --workload
tiny --launches cpu: 0.56 GiB)."""
HEADROOM = 0.10
"""Share of device memory left free: allocator fragmentation on a GPU, page-cache and RSS noise on a CPU."""
TRAINING_LOGITS_COPIES = 3
"""[micro-batch, response, vocab] fp32 tensors alive at once around the loss: the temperature-scaled logits (kept
for the backward pass of the log-softmax), the entropy's softmax and its product with the logits (no gradient); in
the backward pass, the log-softmax's and the gather's gradients beside the kept logits."""
SCORING_FP32_COPIES = 2
"""[chunk, response, vocab] fp32 tensors alive while one model's log-probs are read: the temperature-scaled copy of
its logits and log-sum-exp's exponentials."""
QUANT_BLOCK = 64
"""bitsandbytes 4-bit block size: one fp32 absmax per 64 values."""
DEEPSPEED_OPTIMIZER_BYTES = 12
"""fp32 master weight + two fp32 AdamW moments per trainable parameter under DeepSpeed (ZeRO keeps an fp32 copy of
its partition even when the module is fp32)."""
DEEPSPEED_REDUCE_BUCKET = 500_000_000
"""DeepSpeed's default `reduce_bucket_size` (elements), which the kit's launch configs leave unset: ZeRO-2 and ZeRO-3
allocate a gradient bucket this large (in the gradients' dtype) on each device; on a CPU only the part gradients
are written into becomes resident."""
DEEPSPEED_MAX_LIVE_PARAMETERS = 1_000_000_000
"""DeepSpeed's default `stage3_max_live_parameters` and `stage3_max_reuse_distance` (elements), unset in the kit's
launch configs: ZeRO-3 keeps gathered up to this many parameters it will use again, so a model smaller than this
stays gathered through a whole forward (and backward)."""
MMAP_THRESHOLD_MAX = 32 * 2**20
"""glibc's largest mmap threshold (64-bit): once a freed large block has raised the threshold, only single
allocations above 32 MiB are mapped, and given back to the system when freed; smaller ones come from the heap,
which keeps freed memory for reuse."""

# --- Time-per-update constants ----------------------------------------------------------------------------------
GPU_SPECS = {
    # name: (dense bf16 tensor TFLOP/s, memory bandwidth GB/s), from the vendors' data sheets
    "RTX 4090": (165.0, 1008.0),
    "L4": (121.0, 300.0),
    "A100-80GB": (312.0, 2039.0),
    "H100-80GB": (989.0, 3350.0),
}
MODEL_FLOPS_UTILIZATION = 0.35
"""Share of peak bf16 throughput reached by transformers forwards/backwards (SDPA attention, no fused kernels)."""
QUANTIZED_COMPUTE_PENALTY = 2.0
"""bitsandbytes 4-bit linears dequantize every weight before each matmul: compute through them at half speed."""
DECODE_STEP_OVERHEAD_S_PER_LAYER = 0.0006
"""Python and kernel-launch time per decoder layer per generated token in transformers' `generate` (about 15–20 ms
per token for a 28-layer model at small batch, whatever the model width)."""


# ------------------------------------------------------------------------------------------------------------------
# Architectures


SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class Architecture:
    """The sizes of a decoder-only transformer (Llama-like: RMSNorm, SwiGLU MLP, grouped-query attention)."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    checkpoint_dtype: str

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str) -> "Architecture":
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise RecipeError(
                f"{source}: model_type '{model_type}' is not one the planner sizes ({', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        missing = [
            key
            for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
            if key not in config
        ]
        if missing:
            raise RecipeError(f"{source}: config.json lacks {', '.join(missing)}")
        heads = config["num_attention_heads"]
        attention_bias = bool(config.get("attention_bias", False))
        return cls(
            model_type=model_type,
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            vocab_size=config["vocab_size"],
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; Llama has them (and o_proj's) when `attention_bias` is set.
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type == "llama" and attention_bias,
            mlp_bias=model_type == "llama" and bool(config.get("mlp_bias", False)),
            checkpoint_dtype=config.get("torch_dtype") or config.get("dtype") or "float32",
        )

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one decoder layer, by module name."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def linear_weights_per_layer(self) -> int:
        return sum(fan_in * fan_out for fan_in, fan_out in self.linear_shapes().values())

    @property
    def linear_weights(self) -> int:
        """Weights of the decoder layers' linears: what bitsandbytes quantizes."""
        return self.num_layers * self.linear_weights_per_layer

    @property
    def other_params_per_layer(self) -> int:
        """Biases and the two RMSNorm weights of one decoder layer."""
        biases = (self.q_dim + 2 * self.kv_dim) * self.qkv_bias + self.hidden_size * self.o_bias
        biases += (2 * self.intermediate_size + self.hidden_size) * self.mlp_bias
        return biases + 2 * self.hidden_size

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def head_params(self, head: str) -> int:
        """'lm': the LM head (none when tied to the embedding); 'score': a one-label classifier head, no bias."""
        if head == "score":
            return self.hidden_size
        return 0 if self.tie_word_embeddings else self.embedding_params

    def params(self, head: str) -> int:
        """All parameters of the causal LM (`head='lm'`) or the one-label sequence classifier (`head='score'`)."""
        layers = self.num_layers * (self.linear_weights_per_layer + self.other_params_per_layer)
        return self.embedding_params + layers + self.hidden_size + self.head_params(head)

    def lora_params(self, target_modules: list[str], r: int, dora: bool = False) -> int:
        """LoRA's trainable parameters: r × (in + out) per targeted linear per layer (+ out for DoRA's magnitude)."""
        shapes = self.linear_shapes()
        unknown = [name for name in target_modules if name not in shapes]
        if unknown:
            raise RecipeError(
                f"lora_target_modules: {', '.join(unknown)} not among this {self.model_type} model's linears "
                f"({', '.join(shapes)})"
            )
        per_layer = sum(r * (shapes[name][0] + shapes[name][1]) + dora * shapes[name][1] for name in target_modules)
        return self.num_layers * per_layer

    def saved_bytes_per_token(self, act_bytes: int, seq: int, trained: str, lora_targets=(), lora_r: int = 0,
                              adapter_copy_bytes: int = 0) -> int:
        """Bytes autograd keeps for the backward pass per token of one decoder layer (what
        `torch.autograd.graph.saved_tensors_hooks` sees; tests/test_planner.py checks it against a real forward).
        `trained`: 'full' (every weight) or 'lora' (frozen base, adapters on `lora_targets` of rank `lora_r`).
        `adapter_copy_bytes`: 0 when the adapters compute in the base's dtype and read its tensors; otherwise each
        adapter keeps its own copy of its input at this many bytes per value (fp32 adapters on a 16-bit or quantized
        base: 4, peft's cast; 2 under 16-bit autocast, autocast's cast back).

        Every layer keeps: the fp32 inputs of its two RMSNorms (they compute in fp32); for SDPA, q, k and v (k and v
        repeated to every query head: the padding mask keeps transformers off SDPA's grouped-query path), its output
        and an fp32 log-sum-exp per head, and the float mask it is given ([seq] per token); SwiGLU's gate, SiLU(gate)
        and up. A frozen linear keeps nothing (its weight is a parameter); a trained one keeps its input: in full
        fine-tuning the inputs of q/k/v, gate/up and down_proj (o_proj reads SDPA's output) and the norms' outputs
        before their weights; with LoRA the adapters' inputs (shared per input, or one copy per adapter) and
        lora_A's [r] outputs."""
        h, i, q, b = self.hidden_size, self.intermediate_size, self.q_dim, act_bytes
        size = 2 * h * 4 + 4 * q * b + self.num_heads * 4 + seq * b + 3 * i * b
        if trained == "full":
            return size + 2 * h * b + (2 * h + i) * b
        shapes = self.linear_shapes()
        if adapter_copy_bytes:
            size += sum(shapes[name][0] for name in lora_targets) * adapter_copy_bytes
        else:
            inputs = ((("q_proj", "k_proj", "v_proj"), h), (("gate_proj", "up_proj"), h), (("down_proj",), i))
            size += sum(width for names, width in inputs if set(names) & set(lora_targets)) * b
        return size + len(lora_targets) * lora_r * (adapter_copy_bytes or b)

    def trunk_saved_bytes_per_token(self, act_bytes: int, seq: int, trained: str, lora_targets=(), lora_r: int = 0,
                                    adapter_copy_bytes: int = 0, checkpointing: bool = False) -> int:
        """`saved_bytes_per_token` over every layer, plus the final norm's fp32 input; with a frozen base the first
        layer's first norm keeps nothing (nothing before it is trained). With activation checkpointing each layer
        keeps its input and one layer at a time recomputes the rest."""
        per_layer = self.saved_bytes_per_token(act_bytes, seq, trained, lora_targets, lora_r, adapter_copy_bytes)
        first_norm = 0 if trained == "full" else self.hidden_size * 4
        if checkpointing:
            return self.num_layers * self.hidden_size * act_bytes + per_layer + self.hidden_size * 4
        return self.num_layers * per_layer - first_norm + self.hidden_size * 4

    def largest_unit_params(self) -> int:
        """The largest block ZeRO-3/FSDP gathers at once: a decoder layer, the embedding or the LM head."""
        return max(self.linear_weights_per_layer + self.other_params_per_layer, self.embedding_params)


PEFT_DEFAULT_TARGETS = ["q_proj", "v_proj"]
"""peft's default LoRA targets for llama, mistral and qwen2 (`lora_target_modules` unset)."""


# ------------------------------------------------------------------------------------------------------------------
# Finding a model's config.json


def kit_config_copy(name: str) -> Path:
    return MODEL_CONFIGS_DIR / name / "config.json"


def reward_recipe_base(path: str) -> tuple[str, str, int | None] | None:
    """(base model, reward.yaml, the layers it keeps or None for all) for a reward model the kit trains to `path`
    (a reward recipe's `output_dir`)."""
    wanted = Path(path).as_posix().rstrip("/")
    for recipe in sorted((KIT_ROOT / "configs").glob("*/reward.yaml")):
        settings = yaml.safe_load(recipe.read_text()) or {}
        if str(settings.get("output_dir", "")).rstrip("/") == wanted and settings.get("model_name_or_path"):
            return settings["model_name_or_path"], str(recipe.relative_to(KIT_ROOT)), settings.get("num_hidden_layers")
    return None


def load_architecture(name: str, key: str) -> tuple[Architecture, str]:
    """The architecture of model `name` (recipe field `key`) and where it was read: the model's own folder (a local
    path, or the prepared offline copy of a hub id), the kit's copy under configs/model_configs/, or, for a reward model
    the kit has not trained yet, the base model its reward.yaml names."""
    candidates = [Path(name), KIT_ROOT / name, Path(resolve_model_path(name))]
    for folder in candidates:
        if (folder / "config.json").is_file():
            return _read_architecture(folder / "config.json"), str(folder)
    if kit_config_copy(name).is_file():
        return _read_architecture(kit_config_copy(name)), f"configs/model_configs/{name}"
    trained = reward_recipe_base(name)
    if trained is not None:
        base, recipe, layers = trained
        architecture, source = load_architecture(base, key)
        if layers is not None:
            architecture = dataclasses.replace(architecture, num_layers=layers)
            source = f"{source}, its first {layers} layers"
        return architecture, f"not trained yet: base of {recipe}, {source}"
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise RecipeError(f"{key}: '{name}' is neither a model folder nor the output_dir of a configs/*/reward.yaml")
    raise RecipeError(
        f"{key}: no config.json for '{name}' (no local folder or prepared copy, not in configs/model_configs/); "
        f"write configs/model_configs/{name}/config.json with its architecture"
    )


def _read_architecture(path: Path) -> Architecture:
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise RecipeError(f"{path} is not valid JSON: {error}") from error
    return Architecture.from_config(config, str(path))


# ------------------------------------------------------------------------------------------------------------------
# Hardware and parallelism


@dataclass(frozen=True)
class Parallelism:
    """How the launch config spreads the run: `strategy` is 'none', 'ddp', 'zero2', 'zero3' or 'fsdp'; `processes`
    counts all processes (one per device) on all machines; `shard_group` is how many of them share one set of
    shards."""

    strategy: str
    processes: int
    shard_group: int
    device: str
    source: str

    def describe(self) -> str:
        kind = {"none": "no sharding", "ddp": "data parallel (DDP)", "zero2": "DeepSpeed ZeRO-2",
                "zero3": "DeepSpeed ZeRO-3", "fsdp": "FSDP"}[self.strategy]  # fmt: skip
        shards = f", shards over {self.shard_group}" if self.strategy in ("zero2", "zero3", "fsdp") else ""
        return f"{self.source}: {self.processes} {self.device} process(es), {kind}{shards}"


def load_accelerate_config(path: str):
    """The accelerate config file, read by accelerate's own loader."""
    from accelerate.commands.config.config_args import load_config_from_file

    resolved = Path(path) if Path(path).is_file() else KIT_ROOT / path
    if not resolved.is_file():
        raise RecipeError(f"accelerate config not found: {path}")
    try:
        return load_config_from_file(str(resolved))
    except (ValueError, TypeError) as error:
        raise RecipeError(f"{path}: accelerate cannot read it: {error}") from error


def parallelism_from_accelerate(path: str, processes: int | None = None) -> Parallelism:
    """`processes` overrides the config's `num_processes` (as `accelerate launch --num_processes` does)."""
    config = load_accelerate_config(path)
    kind = str(getattr(config.distributed_type, "value", config.distributed_type))
    total = processes or config.num_processes
    if total is None or total < 1:
        raise RecipeError(f"{path}: num_processes is not set; pass the process count")
    device = "cpu" if config.use_cpu or kind == "MULTI_CPU" else "gpu"
    strategy, group = "ddp" if total > 1 else "none", total
    if kind == "DEEPSPEED":
        stage = int((config.deepspeed_config or {}).get("zero_stage", 0))
        strategy = {2: "zero2", 3: "zero3"}.get(stage, "ddp" if total > 1 else "none")
    elif kind == "FSDP":
        fsdp = config.fsdp_config or {}
        sharding = str(fsdp.get("fsdp_sharding_strategy", fsdp.get("fsdp_reshard_after_forward", "FULL_SHARD")))
        strategy = "zero2" if sharding in ("SHARD_GRAD_OP", "2", "false", "False") else "fsdp"
        if sharding in ("HYBRID_SHARD", "4"):
            group = max(total // max(config.num_machines, 1), 1)
    return Parallelism(strategy=strategy, processes=total, shard_group=group, device=device, source=path)


HARDWARE_KEYS = {"device", "gpu", "gpu_memory_gb", "memory_gb", "gpus_per_node", "nodes", "accelerate_config"}


@dataclass(frozen=True)
class Hardware:
    """What a recipe is written for (one entry of a recipe folder's hardware.yaml). Memory in GiB per device: per
    GPU, or the machine's RAM for a CPU."""

    device: str
    memory_gib: float
    gpus_per_node: int
    nodes: int
    accelerate_config: str
    gpu: str | None = None

    def describe(self) -> str:
        if self.device == "cpu":
            return f"CPU with {self.memory_gib:g} GiB RAM"
        name = f" {self.gpu}" if self.gpu else ""
        return f"{self.nodes} node(s) × {self.gpus_per_node}{name} GPU(s) of {self.memory_gib:g} GiB"


def load_hardware(recipe_path: str, hardware_path: str | None = None) -> Hardware | None:
    """The entry for `recipe_path` (by file name) in `hardware_path`, default the recipe folder's hardware.yaml; a
    file holding one bare entry applies to any recipe. None when the folder declares no hardware."""
    path = Path(hardware_path) if hardware_path else Path(recipe_path).parent / "hardware.yaml"
    if not path.is_file():
        if hardware_path:
            raise RecipeError(f"hardware file not found: {hardware_path}")
        return None
    declared = yaml.safe_load(path.read_text()) or {}
    entry = declared.get(Path(recipe_path).name) if HARDWARE_KEYS.isdisjoint(declared) else declared
    if entry is None:
        return None
    unknown = set(entry) - HARDWARE_KEYS
    if unknown:
        known = ", ".join(sorted(HARDWARE_KEYS))
        raise RecipeError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} (known: {known})")
    device = entry.get("device", "gpu")
    memory_key = "memory_gb" if device == "cpu" else "gpu_memory_gb"
    if memory_key not in entry or "accelerate_config" not in entry:
        raise RecipeError(f"{path}: the entry for {Path(recipe_path).name} needs {memory_key} and accelerate_config")
    if entry.get("gpu") and entry["gpu"] not in GPU_SPECS:
        raise RecipeError(f"{path}: gpu '{entry['gpu']}' is not one of {', '.join(GPU_SPECS)}")
    return Hardware(
        device=device,
        memory_gib=float(entry[memory_key]),
        gpus_per_node=int(entry.get("gpus_per_node", 1)),
        nodes=int(entry.get("nodes", 1)),
        accelerate_config=entry["accelerate_config"],
        gpu=entry.get("gpu"),
    )


# ------------------------------------------------------------------------------------------------------------------
# The models of a recipe


@dataclass
class ModelMemory:
    """One of the four PPO models as the recipe loads it."""

    role: str
    name: str
    source: str
    architecture: Architecture
    head: str
    """'lm' (causal LM) or 'score' (one-label sequence classifier)."""
    dtype: str
    quantization: str
    trainable: str
    """'frozen', 'full' or a LoRA description."""
    trainable_params: int = 0
    trainable_bytes: int = 4
    """Bytes per trainable parameter (and per gradient and AdamW moment with torch's AdamW)."""
    extra_params: int = 0
    """Parameters added to the base model (LoRA adapters, the value head's trainable copy)."""
    lora_targets: tuple[str, ...] = ()
    lora_r: int = 0
    sharded: bool = False

    @property
    def params(self) -> int:
        return self.architecture.params(self.head)

    def weight_bytes(self) -> int:
        """The base model's weights, adapters included, on one device before sharding."""
        arch, dtype_bytes = self.architecture, DTYPE_BYTES[self.dtype]
        linear = arch.linear_weights
        rest = (self.params - linear) * dtype_bytes
        if self.quantization == "4bit":
            quantized = linear // 2 + math.ceil(linear / QUANT_BLOCK) * 4
        elif self.quantization == "8bit":
            out_rows = sum(fan_out for _, fan_out in arch.linear_shapes().values()) * arch.num_layers
            quantized = linear + out_rows * 4
        else:
            quantized = linear * dtype_bytes
        return quantized + rest + self.extra_bytes()

    def root_bytes(self) -> int:
        """Weights outside the decoder layers: the embedding, the final norm and the head."""
        arch = self.architecture
        return (arch.embedding_params + arch.hidden_size + arch.head_params(self.head)) * DTYPE_BYTES[self.dtype]

    def layer_bytes(self) -> int:
        """One decoder layer's weights, its adapters included (what `weight_bytes` holds besides the root)."""
        return math.ceil((self.weight_bytes() - self.root_bytes()) / self.architecture.num_layers)

    def extra_bytes(self) -> int:
        if not self.extra_params:
            return 0
        head_copy = self.architecture.hidden_size if self.head == "score" and self.trainable != "full" else 0
        return (self.extra_params - head_copy) * self.trainable_bytes + head_copy * DTYPE_BYTES[self.dtype]


def resolve_dtype(name: str | None, architecture: Architecture) -> str:
    if name in (None, "auto"):
        name = architecture.checkpoint_dtype
    if name not in DTYPE_BYTES:
        raise RecipeError(f"dtype: '{name}' is not one of {', '.join(DTYPE_BYTES)} or auto")
    return name


def recipe_models(recipe: Recipe) -> list[ModelMemory]:
    """The policy, reference (when separate), value and reward (when a reward model is configured) models."""
    args = recipe.model
    if not args.model_name_or_path:
        raise RecipeError("model_name_or_path is not set")
    policy_arch, policy_source = load_architecture(args.model_name_or_path, "model_name_or_path")
    dtype = resolve_dtype(args.dtype, policy_arch)
    targets = args.lora_target_modules or PEFT_DEFAULT_TARGETS
    if targets in ("all-linear", ["all-linear"]):
        targets = list(policy_arch.linear_shapes())
    targets = [targets] if isinstance(targets, str) else list(targets)
    lora = f"LoRA r={args.lora_r} on {', '.join(targets)}"

    policy = ModelMemory("policy", args.model_name_or_path, policy_source, policy_arch, "lm", dtype,
                         policy_quantization(args), lora if args.use_peft else "full")  # fmt: skip
    if args.use_peft:
        policy.trainable_params = policy.extra_params = policy_arch.lora_params(targets, args.lora_r, args.use_dora)
        policy.lora_targets, policy.lora_r = tuple(targets), args.lora_r
    else:
        policy.trainable_params, policy.trainable_bytes = policy.params, DTYPE_BYTES[dtype]
    models = [policy]

    if reference_mode(args) == "separate":
        name = args.ref_model_name_or_path or args.model_name_or_path
        arch, source = load_architecture(name, "ref_model_name_or_path")
        models.append(ModelMemory("reference", name, source, arch, "lm", dtype, args.ref_quantization, "frozen"))

    reward_arch = None
    if args.reward_model_name_or_path:
        reward_arch, reward_source = load_architecture(args.reward_model_name_or_path, "reward_model_name_or_path")
    if args.value_model_init == "policy_trunk":  # a value head on the policy: hidden_size + 1 fp32 parameters
        head = policy_arch.hidden_size + 1
        policy.extra_params += head
        policy.trainable_params += head
    elif args.value_model_init == "reward_model":
        if reward_arch is None:
            raise RecipeError("value_model_init: 'reward_model' needs reward_model_name_or_path")
        value_name, value_arch, value_source = args.reward_model_name_or_path, reward_arch, reward_source
    else:
        value_name, value_arch, value_source = args.model_name_or_path, policy_arch, policy_source
    if args.value_model_init != "policy_trunk":
        value = ModelMemory("value", value_name, value_source, value_arch, "score", dtype, "none", "full")
        if args.value_use_peft:
            value.trainable = f"{lora} + score head"
            value.extra_params = value_arch.lora_params(targets, args.lora_r, args.use_dora) + value_arch.hidden_size
            value.trainable_params = value.extra_params
            value.lora_targets, value.lora_r = tuple(targets), args.lora_r
        else:
            value.trainable_params, value.trainable_bytes = value.params, DTYPE_BYTES[dtype]
        models.append(value)

    if reward_arch is not None:
        models.append(ModelMemory("reward", args.reward_model_name_or_path, reward_source, reward_arch, "score",
                                  dtype, args.reward_quantization, "frozen"))  # fmt: skip
    return models


# ------------------------------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class Item:
    """`size` bytes one device holds for one reason; `returned` of them are in single allocations above glibc's mmap
    threshold, which a CPU process gives back to the system when it frees them (`MMAP_THRESHOLD_MAX`)."""

    label: str
    size: int
    returned: int = 0

    @classmethod
    def in_pieces(cls, label: str, size: int, piece: int) -> "Item":
        """`size` bytes allocated in pieces of at most `piece` bytes."""
        return cls(label, size, size if piece > MMAP_THRESHOLD_MAX else 0)


@dataclass
class MemoryPlan:
    """Bytes per device: `static` items are held all run; each phase adds its own items on top (on a CPU, also the
    heap the other phases left behind: `kept_bytes`)."""

    models: list[ModelMemory]
    parallel: Parallelism
    static: list[Item] = field(default_factory=list)
    phases: dict[str, list[Item]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def static_bytes(self) -> int:
        return sum(item.size for item in self.static)

    def heap_bytes(self, phase: str) -> int:
        """What `phase` allocates in pieces the allocator keeps once freed."""
        return sum(item.size - item.returned for item in self.phases[phase])

    def kept_bytes(self, phase: str) -> int:
        """On a CPU: heap the other phases freed and glibc's allocator kept. After the first update every phase
        starts from it; it is counted as not reusable by this phase (its pieces have other sizes), which bounds the
        fragmentation from above. Zero on a GPU (`max_memory_allocated`, which the run logs, counts live tensors)."""
        if self.parallel.device != "cpu":
            return 0
        return sum(self.heap_bytes(other) for other in self.phases if other != phase)

    def phase_bytes(self, phase: str) -> int:
        return self.static_bytes + self.kept_bytes(phase) + sum(item.size for item in self.phases[phase])

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phase_bytes)

    @property
    def peak_bytes(self) -> int:
        return self.phase_bytes(self.peak_phase)

    def machine_bytes(self) -> int:
        """What one machine holds: on a CPU every process of the machine shares its RAM."""
        per_machine = self.parallel.processes if self.parallel.device == "cpu" else 1
        return self.peak_bytes * per_machine

    def table(self) -> str:
        lines = [f"launch: {self.parallel.describe()}", "", "models (weights on one device before sharding):"]
        for model in self.models:
            quantized = f" {model.quantization}" if model.quantization != "none" else ""
            lines.append(
                f"  {model.role:<10} {_millions(model.params):>9} params  {model.dtype + quantized:<15}"
                f" {_gib(model.weight_bytes()):>10}  {model.trainable}"
            )
            lines.append(f"  {'':<10} {model.name}  <- {model.source}")
        trainable = sum(m.trainable_params for m in self.models)
        lines.append(f"  trainable: {_millions(trainable)} parameters")
        lines += ["", "held all run:"]
        lines += [f"  {item.label:<72} {_gib(item.size):>10}" for item in self.static]
        lines.append(f"  {'total':<72} {_gib(self.static_bytes):>10}")
        for phase, items in self.phases.items():
            lines += ["", f"{phase} (on top):"]
            lines += [f"  {item.label:<72} {_gib(item.size):>10}" for item in items]
            if self.kept_bytes(phase):
                label = "heap freed by another phase, kept by the allocator"
                lines.append(f"  {label:<72} {_gib(self.kept_bytes(phase)):>10}")
            peak = _gib(self.phase_bytes(phase))
            lines.append(f"  {'peak of this phase (with what is held all run)':<72} {peak:>10}")
        lines += ["", f"peak per device: {_gib(self.peak_bytes)} ({self.peak_phase})"]
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def _gib(size: float) -> str:
    return f"{size / GIB:.2f} GiB"


def _millions(count: int) -> str:
    return f"{count / 1e9:.2f} B" if count >= 1e9 else f"{count / 1e6:.1f} M"


def sequence_length(recipe: Recipe) -> int:
    """Tokens per episode at most: the longest prompt kept plus the longest response."""
    return recipe.data.max_prompt_length + recipe.training.response_length


def activation_bytes_per_value(recipe: Recipe, dtype: str) -> int:
    """bf16/fp16 models, or bf16/fp16 autocast, keep 2-byte activations and logits; fp32 without autocast 4."""
    training = recipe.training
    return 2 if DTYPE_BYTES[dtype] == 2 or training.bf16 or training.fp16 else 4


def plan_memory(recipe: Recipe, parallel: Parallelism) -> MemoryPlan:
    """The per-device memory of `recipe` launched as `parallel` describes."""
    models = recipe_models(recipe)
    training = recipe.training
    policy = models[0]
    trained = [m for m in models if m.role in ("policy", "value")]  # no value model: a head on the policy's trunk
    strategy, shards, cpu = parallel.strategy, parallel.shard_group, parallel.device == "cpu"
    deepspeed = strategy in ("zero2", "zero3")
    deepspeed_16bit = deepspeed and bool(training.bf16 or training.fp16)
    autocast = bool(training.bf16 or training.fp16) and not deepspeed
    launch_dtype = "bfloat16" if training.bf16 else "float16" if training.fp16 else "float32"
    for model in models:
        model.sharded = strategy == "zero3" or (strategy == "fsdp" and model.role in ("policy", "value"))
        if strategy == "zero3" and model.quantization == "none":
            # ZeRO-3 creates and partitions every model it holds in the launch's precision, whatever the recipe's
            # dtype (fp32 under `--mixed_precision no`).
            model.dtype = launch_dtype
            if model.trainable != "frozen":
                model.trainable_bytes = DTYPE_BYTES[launch_dtype]
        elif deepspeed_16bit and model.trainable != "frozen":
            model.trainable_bytes = 2  # DeepSpeed casts the trained module, adapters and value head too
    act_bytes = activation_bytes_per_value(recipe, policy.dtype)

    plan = MemoryPlan(models=models, parallel=parallel)
    for model in models:
        size = model.weight_bytes()
        label = f"{model.role} weights"
        if model.sharded:
            size, label = math.ceil(size / shards), f"{label} (1/{shards})"
        plan.static.append(Item(label, size))

    trainable = [m for m in models if m.trainable != "frozen"]
    optimizer_sharded = strategy in ("zero2", "zero3", "fsdp")
    optimizer_8bit = "8bit" in str(training.optim) and not deepspeed
    for model in trainable:
        per_param = DEEPSPEED_OPTIMIZER_BYTES if deepspeed else 2 if optimizer_8bit else 2 * model.trainable_bytes
        size = model.trainable_params * per_param
        label = f"{model.role} AdamW states ({per_param} B/param)"
        if optimizer_sharded:
            size, label = math.ceil(size / shards), f"{label} (1/{shards})"
        plan.static.append(Item(label, size))
    trainable_params = sum(m.trainable_params for m in trainable)
    gradient_bytes = sum(m.trainable_params * m.trainable_bytes for m in trainable)
    if strategy == "ddp":
        plan.static.append(Item("DDP gradient buckets", gradient_bytes))
    if deepspeed:
        bucket_bytes = 2 if deepspeed_16bit else max(m.trainable_bytes for m in trainable)
        elements = min(DEEPSPEED_REDUCE_BUCKET, trainable_params) if cpu else DEEPSPEED_REDUCE_BUCKET
        written = ", the part written" if cpu else ""
        plan.static.append(Item(f"DeepSpeed gradient bucket ({DEEPSPEED_REDUCE_BUCKET:.0e} elements{written})",
                                elements * bucket_bytes))  # fmt: skip
    if cpu:
        runtime = int(CPU_RUNTIME_GIB * GIB)
        plan.static.append(Item("Python process: imports, tokenizer, prompts, kernels (CPU_RUNTIME_GIB)", runtime))
    else:
        plan.static.append(Item("CUDA context and libraries", int(GPU_RUNTIME_GIB * GIB)))
        if parallel.processes > 1:
            plan.static.append(Item("NCCL buffers", int(COLLECTIVES_GIB * GIB)))

    local_batch = training.per_device_train_batch_size * training.gradient_accumulation_steps
    local_mini_batch = max(local_batch // training.num_mini_batches, 1)
    micro = min(training.per_device_train_batch_size, local_mini_batch)
    chunk = min(training.local_rollout_forward_batch_size, local_batch)
    seq, response = sequence_length(recipe), training.response_length
    arch = policy.architecture
    vocab = arch.vocab_size

    def logits(rows: int, what: str, positions: int = response + 1, bytes_per_value: int = act_bytes,
               copies: int = 1) -> Item:  # fmt: skip
        shape = f"[{rows}, {positions}, {vocab}]"
        size = rows * positions * vocab * bytes_per_value
        dtype = "fp32" if bytes_per_value == 4 else "16-bit"
        return Item.in_pieces(f"{what}, {dtype}{f' ×{copies}' if copies > 1 else ''} {shape}", copies * size, size)

    def kv_cache(rows: int) -> Item:
        per_layer = rows * seq * arch.kv_dim * act_bytes
        return Item.in_pieces(f"KV cache [{rows} seqs × {seq} tokens]", 2 * arch.num_layers * per_layer, per_layer)

    # Gathered weights sit beside the process's own shard, which stays allocated.
    whole_trained = sum(m.weight_bytes() for m in trained)

    def large_tensors(group: list[ModelMemory]) -> int:
        """Bytes of the models' embeddings and untied LM heads that are single allocations above the mmap
        threshold (returned to the system when a CPU process frees them)."""
        sizes = [m.architecture.embedding_params * DTYPE_BYTES[m.dtype] for m in group]
        heads = [size * (m.head == "lm" and not m.architecture.tie_word_embeddings) for m, size in zip(group, sizes)]
        return sum(size for size in sizes + heads if size > MMAP_THRESHOLD_MAX)

    gather, reward_gather = [], []
    if strategy == "zero3":

        def gathered(group: list[ModelMemory]) -> int:
            """What ZeRO-3 holds gathered while `group` (one DeepSpeed engine) runs: the current and prefetched
            layers, or up to its live-parameter limit, the whole model when it is smaller than that."""
            layers = max(2 * m.architecture.largest_unit_params() * DTYPE_BYTES[m.dtype] for m in group)
            live = DEEPSPEED_MAX_LIVE_PARAMETERS * max(DTYPE_BYTES[m.dtype] for m in group)
            return min(sum(m.weight_bytes() for m in group), max(layers, live))

        def gathered_item(label: str, group: list[ModelMemory]) -> Item:
            size = gathered(group)
            return Item(label, size, min(size, large_tensors(group)))

        label = "policy + value weights gathered (layers, or all below DeepSpeed's live limit)"
        gather = [gathered_item(label, trained)]
        reward_gather = [gathered_item(f"{m.role} weights gathered", [m]) for m in models
                         if m.role in ("reference", "reward")]  # fmt: skip
    elif strategy == "fsdp":
        # accelerate wraps an FSDP unit around each decoder layer (PolicyAndValue declares its models' layer classes
        # as `_no_split_modules`) and one around the rest, the root: embeddings, final norms, LM head, score. A
        # forward gathers the root and keeps it until its backward (or, for sampling, the whole call), and one layer
        # at a time with the next one prefetched.
        root = sum(m.root_bytes() for m in trained)
        layers = 2 * max(m.layer_bytes() for m in trained)
        label = "policy + value weights gathered (the root unit, and a layer with the next prefetched)"
        gather = [Item(label, root + layers, large_tensors(trained))]
    sampling_weights = gather
    if strategy == "zero3" and training.ds3_gather_for_generation:
        sampling_weights = [Item("policy + value weights gathered for sampling", whole_trained, large_tensors(trained))]
    if cpu and strategy == "fsdp":
        # Each process loads the models whole and then shards them; on a CPU the freed whole weights stay in the
        # heap (but for pieces above the mmap threshold, such as a large embedding).
        label = "whole weights loaded before sharding, kept by the allocator"
        plan.static.append(Item(label, whole_trained - large_tensors(trained)))
    if cpu and strategy == "ddp":
        # DDP broadcasts every weight of the trained module from the main process when it wraps it, through
        # flattened copies; on a CPU they stay in the heap.
        plan.static.append(Item("copies of DDP's first broadcast of the weights, kept by the allocator", whole_trained))

    plan.phases["generation"] = [kv_cache(chunk), *sampling_weights]

    # Scoring, chunk by chunk: one forward of the trained module gives the policy's logits (and the values); the
    # reference's logits follow while the policy's are still referenced, then each is read in fp32.
    reading = [
        logits(chunk, "policy logits at the response positions"),
        logits(chunk, "reference logits at the response positions"),
        logits(chunk, "temperature-scaled copy and log-softmax temporaries", response, 4, SCORING_FP32_COPIES),
    ]
    if policy in trained and not any(m.role == "value" for m in models):
        # The value head reads the last of the hidden states the policy's forward returns, every layer's.
        hidden = (arch.num_layers + 1) * chunk * seq * arch.hidden_size * act_bytes
        per_layer = hidden // (arch.num_layers + 1)
        forward = [Item.in_pieces(f"hidden states of every layer (value head) [{chunk} × {seq}]", hidden, per_layer),
                   logits(chunk, "policy logits at the response positions")]  # fmt: skip
        if sum(i.size for i in forward) > sum(i.size for i in reading):
            reading = forward
    plan.phases["scoring"] = [*reading, *gather, *reward_gather]

    training_items = []
    gradient_label, gradient_size = "gradients", gradient_bytes
    if strategy in ("zero2", "zero3", "fsdp"):
        gradient_size, gradient_label = math.ceil(gradient_bytes / shards), f"gradients (1/{shards})"
    largest_trainable = max(
        (m.architecture.embedding_params if m.trainable == "full" else 0) * m.trainable_bytes for m in trainable
    )
    training_items.append(Item.in_pieces(gradient_label, gradient_size, largest_trainable))
    checkpointing = activation_checkpointing(recipe)
    tokens = micro * seq
    for model in trained:
        a = model.architecture
        # fp32 adapters on a 16-bit or quantized base each copy their input: peft casts it to fp32, and 16-bit
        # autocast (accelerate's, with bf16/fp16; not DeepSpeed's, which casts the whole module) casts it back.
        cast = not deepspeed_16bit and (DTYPE_BYTES[model.dtype] == 2 or model.quantization != "none")
        adapter_copy_bytes = (2 if autocast else 4) if cast else 0
        kept = a.trunk_saved_bytes_per_token(act_bytes, seq, "full" if model.trainable == "full" else "lora",
                                             model.lora_targets, model.lora_r, adapter_copy_bytes,
                                             checkpointing)  # fmt: skip
        piece = tokens * max(a.intermediate_size, a.q_dim) * 4
        label = f"{model.role} activations ({micro} seqs × {seq} tokens{', checkpointed' if checkpointing else ''})"
        training_items.append(Item.in_pieces(label, tokens * kept, piece))
    training_items.append(logits(micro, "policy logits at the response positions", response, 4, TRAINING_LOGITS_COPIES))
    if not deepspeed and (cpu or strategy == "fsdp"):
        # The trainable weights and optimizer state copied before the first step, so that a non-finite update can be
        # undone (DeepSpeed checks the loss before its steps instead): in host memory, on the device under FSDP.
        snapshot = sum(m.trainable_params * (m.trainable_bytes + (2 if optimizer_8bit else 2 * m.trainable_bytes))
                       for m in trainable)  # fmt: skip
        if strategy == "fsdp":
            snapshot = math.ceil(snapshot / shards)
        label = "copy of the trainable weights and AdamW states (undoes a non-finite update)"
        training_items.append(Item.in_pieces(label, snapshot, largest_trainable))
    training_items += gather
    plan.phases["optimisation"] = training_items

    if training.eval_every_updates:
        rows = training.per_device_eval_batch_size
        sampling = [kv_cache(rows), *sampling_weights]
        reading = [
            logits(rows, "one model's logits at the response positions"),
            logits(rows, "temperature-scaled copy and log-softmax temporaries", response, 4, SCORING_FP32_COPIES),
            *sampling_weights,
        ]
        plan.phases["evaluation"] = max(sampling, reading, key=lambda items: sum(i.size for i in items))

    storage = getattr(recipe.model, "bnb_4bit_quant_storage", None)
    if policy.quantization == "4bit" and strategy in ("zero3", "fsdp") and storage != policy.dtype:
        plan.notes.append(f"sharding 4-bit weights needs bnb_4bit_quant_storage: {policy.dtype}")
    if strategy == "fsdp" and any(m.role in ("reference", "reward") for m in models):
        plan.notes.append("under FSDP the reference and reward models sit on every device whole (not sharded)")
    if not cpu and strategy != "fsdp" and not deepspeed:
        plan.notes.append("host RAM also holds a copy of the trainable weights and AdamW states (undoes a "
                          "non-finite update)")  # fmt: skip
    return plan


# ------------------------------------------------------------------------------------------------------------------
# Fit and fixes


@dataclass
class FitCheck:
    plan: MemoryPlan
    hardware: Hardware
    usable_bytes: int

    @property
    def fits(self) -> bool:
        return self.plan.machine_bytes() <= self.usable_bytes

    def describe(self) -> str:
        what = "per machine" if self.plan.parallel.device == "cpu" else "per GPU"
        verdict = "fits" if self.fits else "does NOT fit"
        return (
            f"{_gib(self.plan.machine_bytes())} {what} of {_gib(self.usable_bytes)} usable "
            f"({self.hardware.memory_gib:g} GiB − {HEADROOM:.0%} headroom) on {self.hardware.describe()}: {verdict}"
        )


def check_fit(plan: MemoryPlan, hardware: Hardware) -> FitCheck:
    return FitCheck(plan, hardware, int(hardware.memory_gib * GIB * (1 - HEADROOM)))


@dataclass(frozen=True)
class Fix:
    """A change to the recipe (command-line flags) or to the launch config."""

    description: str
    flags: tuple[str, ...] = ()
    accelerate_config: str | None = None

    def command_part(self) -> str:
        parts = list(self.flags)
        if self.accelerate_config:
            parts.insert(0, f"[launch with {self.accelerate_config}]")
        return " ".join(parts)


def candidate_fixes(recipe: Recipe, hardware: Hardware, parallel: Parallelism) -> list[Fix]:
    """Changes that lower memory, cheapest (least change to what the run learns, and to its speed) first."""
    args, training = recipe.model, recipe.training
    pd, ga = training.per_device_train_batch_size, training.gradient_accumulation_steps
    separate = reference_mode(args) == "separate"
    fixes = []
    if separate and args.use_peft:
        fixes.append(Fix("reference = the policy with its adapter disabled", ("--reference", "adapter_disabled")))
    if training.local_rollout_forward_batch_size > 1:
        half = str(training.local_rollout_forward_batch_size // 2)
        fixes.append(Fix("halve the rollout's forward chunk", ("--local_rollout_forward_batch_size", half)))
    if separate and args.ref_quantization != "4bit":
        fixes.append(Fix("load the reference in 4 bits", ("--ref_quantization", "4bit")))
    if args.reward_model_name_or_path and args.reward_quantization != "4bit":
        fixes.append(Fix("load the reward model in 4 bits", ("--reward_quantization", "4bit")))
    if pd > 1:
        flags = ("--per_device_train_batch_size", str(pd // 2), "--gradient_accumulation_steps", str(ga * 2))
        fixes.append(Fix("half the micro-batch, twice the accumulation (same episodes per update)", flags))
    if not activation_checkpointing(recipe):
        flags = ("--activation_checkpointing", "true")
        fixes.append(Fix("activation checkpointing (a third more training compute)", flags))
    if not args.value_use_peft:
        fixes.append(Fix("train the critic with LoRA", ("--value_use_peft", "true")))
    if "8bit" not in str(training.optim) and parallel.strategy not in ("zero2", "zero3"):
        fixes.append(Fix("8-bit AdamW states", ("--optim", "paged_adamw_8bit")))
    if args.use_peft and not (args.load_in_4bit or args.load_in_8bit):
        fixes.append(Fix("QLoRA: the policy's base in 4 bits", ("--load_in_4bit", "true")))
    gpus = hardware.gpus_per_node * hardware.nodes
    if hardware.device == "gpu" and gpus > 1 and parallel.strategy != "zero3":
        config = "deepspeed_zero3.yaml" if hardware.nodes == 1 else "multi_node_zero3.yaml"
        fixes.append(Fix(f"DeepSpeed ZeRO-3 over the {gpus} GPUs", accelerate_config=f"configs/accelerate/{config}"))
    if ga > 1 and (ga // 2 * pd) % training.num_mini_batches == 0:
        flags = ("--gradient_accumulation_steps", str(ga // 2))
        fixes.append(Fix("fewer episodes per update (half the accumulation)", flags))
    if training.response_length > 16:
        flags = ("--response_length", str(training.response_length // 2))
        fixes.append(Fix("shorter responses (changes the task)", flags))
    return fixes


def activation_checkpointing(recipe: Recipe) -> bool:
    """The recipe's `activation_checkpointing`, or its deprecated alias `gradient_checkpointing`."""
    training = recipe.training
    return bool(getattr(training, "activation_checkpointing", False) or training.gradient_checkpointing)


@dataclass
class PlanRequest:
    """What to plan: the recipe's command-line arguments, the hardware and the launch config."""

    recipe_args: list[str]
    hardware: Hardware | None
    accelerate_config: str | None
    num_processes: int | None = None
    device: str | None = None
    """'cpu' or 'gpu' when the processes run elsewhere than the launch config says (a GPU launch config started on
    a machine without GPUs runs on CPU processes, as the launch tests do)."""

    def parse(self, extra_flags: tuple[str, ...] = ()) -> Recipe:
        return parse_recipe([*self.recipe_args, *extra_flags])

    def parallelism(self, accelerate_config: str | None = None) -> Parallelism:
        declared = self.hardware.accelerate_config if self.hardware else None
        path = accelerate_config or self.accelerate_config or declared
        if path is None:
            parallel = Parallelism("none", self.num_processes or 1, 1, "gpu", "no launch config (one process)")
        else:
            parallel = parallelism_from_accelerate(path, None if accelerate_config else self.num_processes)
        return dataclasses.replace(parallel, device=self.device) if self.device else parallel


def cheapest_fixes(request: PlanRequest) -> list[list[Fix]]:
    """Each single change that makes the recipe fit, cheapest first; when none does alone, the shortest run of changes
    in cost order that does (one list). Empty when nothing in the list is enough."""
    if request.hardware is None:
        return []
    recipe = request.parse()
    base = request.parallelism()
    candidates = candidate_fixes(recipe, request.hardware, base)

    def fits(applied: list[Fix]) -> bool:
        flags = tuple(flag for fix in applied for flag in fix.flags)
        launch = next((fix.accelerate_config for fix in applied if fix.accelerate_config), None)
        try:
            plan = plan_memory(request.parse(flags), request.parallelism(launch))
        except RecipeError:
            return False
        return check_fit(plan, request.hardware).fits

    singles = [[fix] for fix in candidates if fits([fix])]
    if singles:
        return singles
    applied = []
    for fix in candidates:
        applied.append(fix)
        if fits(applied):
            return [applied]
    return []


# ------------------------------------------------------------------------------------------------------------------
# Time per update


@dataclass(frozen=True)
class UpdateTime:
    generation_s: float
    scoring_s: float
    training_s: float

    @property
    def total_s(self) -> float:
        return self.generation_s + self.scoring_s + self.training_s

    def describe(self) -> str:
        return (
            f"time per update (estimate): {self.total_s:.0f} s = generation {self.generation_s:.0f} s + scoring "
            f"{self.scoring_s:.0f} s + PPO epochs {self.training_s:.0f} s"
        )


def estimate_update_time(plan: MemoryPlan, recipe: Recipe, gpu: str) -> UpdateTime:
    """A rough estimate per update on each device (devices work in parallel on their own episodes):

    - generation is bound by reading the policy's weights once per token (4-bit weights count as bf16: bitsandbytes
      dequantizes them for each matmul), plus a fixed Python/launch cost per layer per token;
    - scoring and training are bound by compute: 2·N FLOPs per token per forward, 2·N more for a backward through a
      frozen (LoRA) model and 4·N through a trained one, 2·N more with activation checkpointing, at
      MODEL_FLOPS_UTILIZATION of the GPU's peak (halved through 4-bit linears);
    - communication between devices is assumed hidden behind compute, except gathering ZeRO-3 weights for
      generation, which is not modelled."""
    tflops, bandwidth = GPU_SPECS[gpu]
    flops_per_s = tflops * 1e12 * MODEL_FLOPS_UTILIZATION
    training = recipe.training
    local_batch = training.per_device_train_batch_size * training.gradient_accumulation_steps
    chunk = min(training.local_rollout_forward_batch_size, local_batch)
    seq, response = sequence_length(recipe), training.response_length
    by_role = {m.role: m for m in plan.models}
    policy = by_role["policy"]

    def slowdown(model: ModelMemory) -> float:
        return QUANTIZED_COMPUTE_PENALTY if model.quantization != "none" else 1.0

    read_bytes = policy.params * 2 if policy.quantization != "none" else policy.weight_bytes()
    step = max(read_bytes / (bandwidth * 1e9), 2 * policy.params * chunk / flops_per_s * slowdown(policy))
    step += policy.architecture.num_layers * DECODE_STEP_OVERHEAD_S_PER_LAYER
    generation = math.ceil(local_batch / chunk) * response * step

    tokens = local_batch * seq
    trained = [m for m in (policy, by_role.get("value")) if m is not None]
    scored = [by_role.get("reference", policy), *trained, *([by_role["reward"]] if "reward" in by_role else [])]
    scoring = sum(2 * m.params * tokens * slowdown(m) for m in scored) / flops_per_s

    checkpointing = activation_checkpointing(recipe)
    train_flops = 0.0
    for model in trained:
        per_token = 2 + (4 if model.trainable == "full" else 2) + (2 if checkpointing else 0)
        train_flops += per_token * model.params * slowdown(model)
    training_s = training.num_ppo_epochs * tokens * train_flops / flops_per_s
    return UpdateTime(generation, scoring, training_s)


def plan_recipe(request: PlanRequest) -> tuple[MemoryPlan, FitCheck | None]:
    plan = plan_memory(request.parse(), request.parallelism())
    hardware = request.hardware
    if hardware is not None:
        expected = hardware.gpus_per_node * hardware.nodes if hardware.device == "gpu" else None
        if expected is not None and plan.parallel.processes != expected:
            plan.notes.append(
                f"the launch config starts {plan.parallel.processes} processes but the hardware has {expected} GPUs"
            )
    return plan, (check_fit(plan, hardware) if hardware is not None else None)


def as_dict(plan: MemoryPlan) -> dict[str, Any]:
    """The plan's numbers (bytes), for tests and tools."""
    return {
        "models": [
            {**{k: v for k, v in dataclasses.asdict(m).items() if k != "architecture"}, "params": m.params,
             "weight_bytes": m.weight_bytes()}
            for m in plan.models
        ],
        "static": {item.label: item.size for item in plan.static},
        "phases": {phase: {item.label: item.size for item in items} for phase, items in plan.phases.items()},
        "kept": {phase: plan.kept_bytes(phase) for phase in plan.phases},
        "phase_peaks": {phase: plan.phase_bytes(phase) for phase in plan.phases},
        "peak_bytes": plan.peak_bytes,
    }  # fmt: skip
