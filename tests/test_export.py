"""scripts/export.py on tiny runs: a LoRA policy merged into its base gives the adapter-on-base's greedy outputs; a
QLoRA policy is merged into its base reloaded in the compute dtype; a checkpoint and a kit-trained reward model
export too; the card holds the evaluation's figures, the reward model's validation accuracy and the recipe; a push
reaches a fake hub on 127.0.0.1 that records the upload; bad input is one error line naming the argument, with
nothing written."""

import base64
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig

from recipes.errors import RecipeError
from recipes.export import ExportArguments, export_model, headline_figures

from conftest import PPO_SCRIPT, PROMPTS, REPO_ROOT, run_python, tiny_recipe_flags, write_prompt_files
from test_hub import documented_commands, run_documented

pytestmark = pytest.mark.slow

EXPORT_SCRIPT = "scripts/export.py"
QUESTIONS = ["Tell me about the movie.", "How was your day?", "Describe the weather at the sea."]
# A learning rate 100 times the tiny recipe's: after 2 updates the adapter changes the logits visibly, so that
# comparisons below cannot pass with an adapter left out.
TRAINED = ("--learning_rate", "1e-2")


def ppo_run(tiny_models, output_dir: Path, *flags: str) -> Path:
    prompts = write_prompt_files(output_dir.parent / "prompts", PROMPTS)["jsonl"]
    result = run_python([str(PPO_SCRIPT), *tiny_recipe_flags(tiny_models, prompts, output_dir, *TRAINED, *flags)],
                        cwd=REPO_ROOT)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Path:
    """Where the runs below go, laid out as the default pipeline's outputs (outputs/smollm2-135m/{ppo,eval,
    reward_model}), so that docs/cluster.md's commands run on them as written."""
    return tmp_path_factory.mktemp("tree") / "outputs" / "smollm2-135m"


@pytest.fixture(scope="module")
def lora_run(tiny_models, outputs) -> Path:
    """configs/tiny/ppo.yaml (LoRA, float32): 2 updates, a checkpoint after the first; evaluated into a sibling
    folder."""
    run = ppo_run(tiny_models, outputs / "ppo", "--save_steps", "1")
    result = run_python(["scripts/evaluate.py", "--config", "configs/tiny/eval.yaml", "--policy_name_or_path", str(run),
                         "--reward_models", str(tiny_models["reward"]), "--output_dir", str(outputs / "eval")],
                        cwd=REPO_ROOT)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def qlora_run(tiny_models, tmp_path_factory) -> Path:
    """The tiny recipe through LoRA on a 4-bit (nf4) base computing in bfloat16: 2 updates."""
    output_dir = tmp_path_factory.mktemp("qlora") / "ppo"
    return ppo_run(tiny_models, output_dir, "--load_in_4bit", "true", "--dtype", "bfloat16")


@pytest.fixture(scope="module")
def reward_model(tiny_models, outputs) -> Path:
    """A reward model trained by scripts/train_reward.py (configs/tiny/reward.yaml) on the HH-RLHF fixture."""
    output_dir = outputs / "reward_model"
    result = run_python(["scripts/train_reward.py", "--config", "configs/tiny/reward.yaml",
                         "--model_name_or_path", str(tiny_models["policy"]),
                         "--dataset_name", "tests/data/preferences/hh_rlhf", "--output_dir", str(output_dir)],
                        cwd=REPO_ROOT)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


def export(*flags: str):
    return run_python([EXPORT_SCRIPT, *flags], cwd=REPO_ROOT)


def prompt_ids(tokenizer) -> list[torch.Tensor]:
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        for question in QUESTIONS
    ]  # fmt: skip


@torch.no_grad()
def greedy(model, tokenizer) -> list[list[int]]:
    outputs = []
    for ids in prompt_ids(tokenizer):
        generated = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        outputs.append(generated[0, ids.shape[1] :].tolist())
    return outputs


@torch.no_grad()
def last_logits(model, tokenizer) -> torch.Tensor:
    """fp32 logits at every prompt position of every prompt, concatenated."""
    return torch.cat([model(ids).logits[0].float() for ids in prompt_ids(tokenizer)])


def greedy_predictions(logits: torch.Tensor, margin: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(the greedy next token at every prompt position, whether its lead over the runner-up exceeds `margin`).
    The random tiny models continue a prompt by repeating its last token, so greedy generation (checked too) says
    little; the greedy choice after every prefix of real prompts is where a wrong merge would show."""
    top = logits.topk(2, dim=-1)
    return top.indices[:, 0], top.values[:, 0] - top.values[:, 1] > margin


def adapter_on_base(run: Path, base: Path, **loading) -> PeftModel:
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, **loading), run).eval()


def test_merged_policy_gives_the_adapter_on_base_greedy_outputs(lora_run, tiny_models, tmp_path):
    target = tmp_path / "export"
    result = export("--model_dir", str(lora_run), "--output_dir", str(target))
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in target.iterdir()) == [
        "README.md", "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
        "tokenizer.json", "tokenizer_config.json",
    ]  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(target)
    assert tokenizer.pad_token == AutoTokenizer.from_pretrained(lora_run).pad_token  # the run's pad token
    merged = AutoModelForCausalLM.from_pretrained(target).eval()
    on_base = adapter_on_base(lora_run, tiny_models["policy"], dtype=torch.float32)
    assert greedy(merged, tokenizer) == greedy(on_base, tokenizer)
    merged_logits, on_base_logits = last_logits(merged, tokenizer), last_logits(on_base, tokenizer)
    assert torch.equal(greedy_predictions(merged_logits)[0], greedy_predictions(on_base_logits)[0])
    torch.testing.assert_close(merged_logits, on_base_logits, rtol=0, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(tiny_models["policy"]).eval()
    base_logits = last_logits(base, tokenizer)
    assert (merged_logits - base_logits).abs().max() > 0.05, "adapter left out"
    assert not torch.equal(greedy_predictions(merged_logits)[0], greedy_predictions(base_logits)[0])


def test_checkpoint_exports_its_own_policy(lora_run, tiny_models, tmp_path):
    checkpoint = lora_run / "checkpoints" / "update-000001"
    target = tmp_path / "export"
    result = export("--model_dir", str(checkpoint), "--output_dir", str(target))
    assert result.returncode == 0, result.stderr[-3000:]
    tokenizer = AutoTokenizer.from_pretrained(target)
    merged = AutoModelForCausalLM.from_pretrained(target).eval()
    at_checkpoint = adapter_on_base(checkpoint, tiny_models["policy"], dtype=torch.float32)
    at_end = adapter_on_base(lora_run, tiny_models["policy"], dtype=torch.float32)
    torch.testing.assert_close(last_logits(merged, tokenizer), last_logits(at_checkpoint, tokenizer), rtol=0, atol=1e-5)
    assert not torch.allclose(last_logits(merged, tokenizer), last_logits(at_end, tokenizer), atol=1e-3)
    card = (target / "README.md").read_text()
    assert "update 1 (4 episodes)" in card
    assert "Not evaluated" in card  # the evaluation beside the run is of its final policy, not of this checkpoint


def test_qlora_policy_is_merged_into_its_base_in_the_compute_dtype(qlora_run, tiny_models, tmp_path):
    """The adapter was trained on a 4-bit copy of the base; the export merges it into the base's own weights loaded
    in the compute dtype (bfloat16), not into 4-bit weights. So it equals the adapter on that bfloat16 base (up to
    bfloat16 rounding of the merged sum), and it cannot equal the trained policy (the adapter on the 4-bit base,
    i.e. on the dequantized base): the two differ by the base's quantization error, which the export leaves out.
    The honest checks are therefore: equal to adapter-on-bf16-base; as far from the trained policy as the plain base
    is from its 4-bit copy; much closer to it than the base without the adapter is."""
    target = tmp_path / "export"
    result = export("--model_dir", str(qlora_run), "--output_dir", str(target))
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((target / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(target, dtype="auto").eval()
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    tokenizer = AutoTokenizer.from_pretrained(target)

    on_base = adapter_on_base(qlora_run, tiny_models["policy"], dtype=torch.bfloat16)
    assert greedy(merged, tokenizer) == greedy(on_base, tokenizer)
    # bfloat16 keeps 8 bits of mantissa: W + BA rounded once, against W x + B(A x) rounded step by step; the greedy
    # choice must agree wherever it leads by more than twice that tolerance.
    merged_logits, on_base_logits = last_logits(merged, tokenizer), last_logits(on_base, tokenizer)
    torch.testing.assert_close(merged_logits, on_base_logits, rtol=0, atol=2e-2)
    choices, clear = greedy_predictions(on_base_logits, margin=4e-2)
    assert clear.float().mean() > 0.5
    assert torch.equal(greedy_predictions(merged_logits)[0][clear], choices[clear])

    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    trained = adapter_on_base(qlora_run, tiny_models["policy"], quantization_config=nf4)
    base = AutoModelForCausalLM.from_pretrained(tiny_models["policy"], dtype=torch.bfloat16).eval()
    base_4bit = AutoModelForCausalLM.from_pretrained(tiny_models["policy"], quantization_config=nf4).eval()
    merged_logits, trained_logits = last_logits(merged, tokenizer), last_logits(trained, tokenizer)
    quantization_error = (last_logits(base, tokenizer) - last_logits(base_4bit, tokenizer)).abs().max()
    adapter_effect = (trained_logits - last_logits(base_4bit, tokenizer)).abs().max()
    gap = (merged_logits - trained_logits).abs().max()
    assert adapter_effect > 2 * quantization_error, "the adapter must matter for this check to mean anything"
    assert gap < 1.5 * quantization_error + 2e-2
    assert (merged_logits - last_logits(base, tokenizer)).abs().max() > 0.5 * adapter_effect


def test_card_holds_the_evaluation_the_recipe_and_the_reward(lora_run, tmp_path):
    target = tmp_path / "export"
    result = export("--model_dir", str(lora_run), "--output_dir", str(target))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"model card: evaluation of {lora_run.parent / 'eval'}" in result.stdout  # found beside the run
    results = json.loads((lora_run.parent / "eval" / "eval_results.json").read_text())
    card = ModelCard.load(target / "README.md")
    reported = {result.metric_type: result.metric_value for result in card.data.eval_results}
    keys = headline_figures(results)
    assert {"reward/sentiment/mean", "reference/reward/sentiment/mean", "win_rate/sentiment", "kl/k1/mean",
            "perplexity/policy", "perplexity/reference", "reward/reward/mean"} <= set(keys)  # fmt: skip
    assert reported == {key: results[key] for key in keys}
    text = card.text
    for key in keys:
        assert f"{results[key]:.4g}" in text, key
    assert "| reward | reward model (proxy) |" in text and "| sentiment | reward function |" in text
    assert (lora_run / "recipe.yaml").read_text().rstrip() in text
    assert card.data.pipeline_tag == "text-generation" and "ppo" in card.data.tags


def test_reward_model_exports_with_its_validation_accuracy(reward_model, tmp_path):
    target = tmp_path / "export"
    result = export("--model_dir", str(reward_model), "--output_dir", str(target))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (target / "model.safetensors").read_bytes() == (reward_model / "model.safetensors").read_bytes()
    assert not (target / "recipe.yaml").exists() and not (target / "metrics.jsonl").exists()
    final = [json.loads(line) for line in (reward_model / "metrics.jsonl").read_text().splitlines() if line.strip()][-1]
    card = ModelCard.load(target / "README.md")
    assert f"Accuracy {final['final/eval/accuracy']:.3f} (chosen scored above rejected in 2 held-out pairs" in card.text
    assert (reward_model / "recipe.yaml").read_text().rstrip() in card.text
    assert card.data.pipeline_tag == "text-classification"
    model = AutoModelForSequenceClassification.from_pretrained(target)
    assert model.config.num_labels == 1


# ---------------------------------------------------------------------------------------------------------------
# Pushing to a hub on 127.0.0.1


class UploadRecorder(ThreadingHTTPServer):
    """The parts of the hub's upload interface huggingface_hub's HfApi uses for a folder of small files: create the
    repository, validate the card's metadata, ask how each file is uploaded (answer: 'regular', inline in the
    commit), and the commit itself (NDJSON; the files base64-encoded). Records each request; 404 for anything
    else. (Large files would be 'lfs' or Xet uploads on the real hub: not exercised here.)"""

    def __init__(self):
        self.requests: list[dict] = []
        self.files: dict[str, bytes] = {}
        super().__init__(("127.0.0.1", 0), _recorder_handler(self))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def _recorder_handler(hub: UploadRecorder):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            hub.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            path = self.path.split("?")[0]
            if path == "/api/repos/create":
                request = json.loads(body)
                self._json({"url": f"{hub.url}/{request['organization']}/{request['name']}"})
            elif path == "/api/validate-yaml":
                self._json({})
            elif path.endswith("/preupload/main"):
                files = json.loads(body)["files"]
                self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                      for f in files]})  # fmt: skip
            elif path.endswith("/commit/main"):
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        hub.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                repo = path.removeprefix("/api/models/").removesuffix("/commit/main")
                self._json({"commitUrl": f"{hub.url}/{repo}/commit/{'0' * 40}", "commitOid": "0" * 40})
            else:
                self.send_error(404)

        def do_GET(self):
            hub.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": b""})
            self.send_error(404)

        def _json(self, payload):
            data = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


@pytest.fixture
def fake_hub():
    hub = UploadRecorder()
    thread = threading.Thread(target=hub.serve_forever, daemon=True)
    thread.start()
    yield hub
    hub.shutdown()
    hub.server_close()


def hub_env(hub: UploadRecorder, tmp_path: Path) -> dict:
    """The hub at 127.0.0.1 (HF_ENDPOINT), a token, an HF home of the test's own; no proxy for the local address."""
    return {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_test_token", "HF_HOME": str(tmp_path / "hf_home"),
            "HF_HUB_DISABLE_TELEMETRY": "1", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}  # fmt: skip


def test_push_uploads_the_exported_folder_to_the_hub(lora_run, fake_hub, tmp_path):
    target = tmp_path / "export"
    env = hub_env(fake_hub, tmp_path)
    os_env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    result = run_python([EXPORT_SCRIPT, "--model_dir", str(lora_run), "--output_dir", str(target), "--push_to_hub",
                         "true", "--hub_model_id", "tester/tiny-ppo", "--hub_private", "true"],
                        cwd=REPO_ROOT, env={**os_env, **env})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"pushed to {fake_hub.url}/tester/tiny-ppo/commit/" in result.stdout
    paths = [request["path"].split("?")[0] for request in fake_hub.requests]
    assert paths == ["/api/repos/create", "/api/validate-yaml", "/api/models/tester/tiny-ppo/preupload/main",
                     "/api/models/tester/tiny-ppo/commit/main"]  # fmt: skip
    create = json.loads(fake_hub.requests[0]["body"])
    assert (create["organization"], create["name"], create["visibility"]) == ("tester", "tiny-ppo", "private")
    assert all(request["auth"] == "Bearer hf_test_token" for request in fake_hub.requests)
    assert json.loads(fake_hub.requests[1]["body"])["content"] == (target / "README.md").read_text()
    local = {p.name: p.read_bytes() for p in target.iterdir()}
    assert fake_hub.files == local
    assert ModelCard.load(target / "README.md").data.model_name == "tester/tiny-ppo"


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def bad_inputs(lora_run: Path, tiny_models, tmp_path: Path) -> dict[str, tuple[dict, str]]:
    """name → (export arguments, the start of the error)."""
    full = tmp_path / "not_empty"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints" / "update-000001").mkdir(parents=True)
    (unfinished / "recipe.yaml").write_text((lora_run / "recipe.yaml").read_text())
    other_eval = tmp_path / "other_eval"
    other_eval.mkdir()
    (other_eval / "eval_results.json").write_text(json.dumps({"policy": "somewhere/else", "kl/k1/mean": 0.0}))
    out = str(tmp_path / "out")
    return {
        "no such folder": ({"model_dir": str(tmp_path / "missing"), "output_dir": out}, "model_dir: no folder at"),
        "not a kit output": ({"model_dir": str(tiny_models["policy"]), "output_dir": out},
                             "model_dir: " + str(tiny_models["policy"]) + " is not an output of this kit"),
        "unfinished run": ({"model_dir": str(unfinished), "output_dir": out}, "model_dir: " + str(unfinished)
                           + " holds no final policy"),
        "output not empty": ({"model_dir": str(lora_run), "output_dir": str(full)}, "output_dir: "),
        "output inside the run": ({"model_dir": str(lora_run), "output_dir": str(lora_run / "export")},
                                  "output_dir: "),
        "push without id": ({"model_dir": str(lora_run), "output_dir": out, "push_to_hub": True}, "hub_model_id: "),
        "id without owner": ({"model_dir": str(lora_run), "output_dir": out, "push_to_hub": True,
                              "hub_model_id": "tiny-ppo"}, "hub_model_id: 'tiny-ppo' needs its owner"),
        "id without push": ({"model_dir": str(lora_run), "output_dir": out, "hub_model_id": "a/b"},
                            "hub_model_id/hub_private are set but push_to_hub is not"),
        "evaluation of another policy": ({"model_dir": str(lora_run), "output_dir": out, "eval_dir": str(other_eval)},
                                         f"eval_dir: {other_eval} evaluated somewhere/else"),
        "evaluation folder without results": ({"model_dir": str(lora_run), "output_dir": out,
                                               "eval_dir": str(tmp_path)}, "eval_dir: no eval_results.json"),
    }  # fmt: skip


def test_bad_input_is_one_error_naming_the_argument_and_nothing_is_written(lora_run, tiny_models, tmp_path):
    for name, (arguments, message) in bad_inputs(lora_run, tiny_models, tmp_path).items():
        before = sorted(p.name for p in tmp_path.iterdir())
        with pytest.raises(RecipeError) as error:
            export_model(ExportArguments(**arguments))
        assert str(error.value).startswith(message), (name, str(error.value))
        assert sorted(p.name for p in tmp_path.iterdir()) == before, name
        assert not (lora_run / "export").exists()
    assert (tmp_path / "not_empty" / "keep.txt").read_text() == "mine"


def test_script_prints_one_error_line(lora_run, tmp_path):
    target = tmp_path / "out"
    result = export("--model_dir", str(lora_run), "--output_dir", str(target), "--push_to_hub", "true")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: hub_model_id: --push_to_hub needs")
    assert "Traceback" not in result.stderr
    assert not target.exists() and not list(tmp_path.glob(".*partial"))


# ---------------------------------------------------------------------------------------------------------------
# docs/cluster.md, "Export and publishing": its commands as written, on the runs above (laid out as the default
# pipeline's outputs), the second one on the tiny run's checkpoint, the push to the fake hub


def test_docs_export_and_publishing(lora_run, reward_model, outputs, fake_hub, tmp_path):
    commands = documented_commands("Export and publishing")
    assert [command.split()[:2] for command in commands] == [["python", EXPORT_SCRIPT]] * 3 + [
        ["export", "HF_TOKEN=<your"], ["python", EXPORT_SCRIPT]]  # fmt: skip
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    env.update(hub_env(fake_hub, tmp_path))
    del env["HF_TOKEN"]  # the documented `export HF_TOKEN=...` line gives it
    stand_ins = {"outputs/smollm2-135m": str(outputs), "update-000008": "update-000001", "<user>": "tester",
                 "<your token>": "hf_test_token"}  # fmt: skip
    run_documented("Export and publishing", env, stand_ins, ppo_flags=[])
    for folder, kind in (("export", "text-generation"), ("export-update-8", "text-generation"),
                         ("reward_model-export", "text-classification")):  # fmt: skip
        assert ModelCard.load(outputs / folder / "README.md").data.pipeline_tag == kind
    assert fake_hub.files == {p.name: p.read_bytes() for p in (outputs / "export").iterdir()}
    assert [r["path"] for r in fake_hub.requests][-1] == "/api/models/tester/smollm2-135m-sentiment-ppo/commit/main"
