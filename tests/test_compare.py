"""bench/compare.py's report on a constructed result set: the table's rows and figures (mean ± std over seeds), the
reference's own row, and the plot."""

import re

from bench.compare import METHODS, markdown, plot, reference_row


def row(gold: float, proxy: float, kl: float) -> dict:
    return {
        "reward/sentiment/mean": gold, "reward/reward_model/mean": proxy, "kl/k1/mean": kl,
        "win_rate/sentiment": 0.5 + gold / 4, "eos_rate": 0.1, "distinct_1": 0.4, "perplexity/policy": 5.0,
        "reference/reward/sentiment/mean": 0.4, "reference/reward/reward_model/mean": 0.3, "reference/eos_rate": 0.07,
        "reference/distinct_1": 0.41, "perplexity/reference": 4.7,
    }  # fmt: skip


def constructed() -> dict:
    timing = [{"wall_seconds": 600.0, "cpu_seconds": 1200.0, "completions_sampled": "128"},
              {"wall_seconds": 660.0, "cpu_seconds": 1260.0, "completions_sampled": "128"}]  # fmt: skip
    methods = {
        "ppo": {"timing": timing, "finals": [row(0.6, 1.0, 8.0), row(0.8, 1.2, 6.0)],
                "curve": [row(0.5, 0.6, 2.0), row(0.6, 1.0, 8.0)]},
        "dpo": {"timing": timing, "finals": [row(0.5, 0.7, 3.0), row(0.5, 0.9, 5.0)], "curve": [row(0.5, 0.7, 3.0)]},
    }  # fmt: skip
    return {"date": "2026-12-02", "machine": "2 CPU cores", "seeds": [42, 43], "methods": methods,
            "reference": reference_row(methods["ppo"]["finals"][0])}  # fmt: skip


def test_table_gives_each_method_its_mean_and_spread_over_seeds():
    table = markdown(constructed())
    lines = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    # ppo: gold 0.6 and 0.8 → 0.700 ± 0.141; KL 8 and 6 → 7.00 ± 1.41; wall 10 and 11 min → 10.5 ± 0.7.
    assert "| 0.700 ± 0.141 | 1.100 ± 0.141 | 7.00 ± 1.41 |" in lines["ppo"]
    assert lines["ppo"].endswith("| 128 | 10.5 ± 0.7 | 20.5 ± 0.7 |")
    assert "| 0.500 ± 0.000 | 0.800 ± 0.141 | 4.00 ± 1.41 |" in lines["dpo"]
    # The reference: its own gold, proxy, EOS rate and perplexity; KL 0 and win-rate 0.5 by definition.
    assert lines["reference (SmolLM2-135M-Instruct)"].startswith(
        "| reference (SmolLM2-135M-Instruct) | | 0.400 | 0.300 | 0.00 | 0.50 | 0.07 | 0.41 | 4.70 |"
    )
    assert re.search(r"seeds 42, 43", table)


def test_plot_is_written(tmp_path):
    plot(constructed(), tmp_path / "compare.png")
    assert (tmp_path / "compare.png").stat().st_size > 10_000


def test_every_method_has_a_recipe_and_a_script():
    from recipes import REPO_ROOT

    for method in METHODS:
        assert (REPO_ROOT / method.recipe).is_file() and (REPO_ROOT / method.script).is_file(), method.name


def test_checkpoints_are_in_training_order(tmp_path):
    rloo = next(method for method in METHODS if method.name == "rloo")
    for step in (128, 32, 96, 64):
        (tmp_path / f"checkpoint-{step}").mkdir()
    assert [path.name for path in rloo.checkpoints(tmp_path)] == [f"checkpoint-{n}" for n in (32, 64, 96, 128)]


def test_evaluations_of_earlier_runs_are_read_back(tmp_path):
    """A sweep of the first seed's checkpoints, then a later part with the seeds added since: every policy's row."""
    import json

    from bench.compare import evaluated_rows

    sweep_rows = [{"policy": "run/checkpoint-32", "kl/k1/mean": 1.0}, {"policy": "run/seed-42", "kl/k1/mean": 2.0}]
    (tmp_path / "sweep.jsonl").write_text("".join(json.dumps(row) + "\n" for row in sweep_rows))
    (tmp_path / "eval_results.json").write_text(json.dumps(sweep_rows[-1]))
    (tmp_path / "part-2").mkdir()
    (tmp_path / "part-2" / "eval_results.json").write_text(json.dumps({"policy": "run/seed-43", "kl/k1/mean": 3.0}))
    (tmp_path / "killed").mkdir()  # an evaluation stopped before writing its results adds nothing
    rows = evaluated_rows(tmp_path)
    assert {policy: row["kl/k1/mean"] for policy, row in rows.items()} == {
        "run/checkpoint-32": 1.0, "run/seed-42": 2.0, "run/seed-43": 3.0,
    }  # fmt: skip


def test_table_names_the_runs_not_made():
    """A method finished for some seeds only (make compare --finished_only) reports those, and the rest are named."""
    results = constructed()
    dpo = results["methods"]["dpo"]
    dpo.update(seeds=[42], timing=dpo["timing"][:1], finals=dpo["finals"][:1])
    table = markdown(results)
    assert "| dpo | 42 | 0.500 | 0.700 | 3.00 |" in table
    assert "| ppo | 42, 43 | 0.700 ± 0.141 |" in table
    assert (
        "Not run in this measurement: rloo (seeds 42, 43); grpo (seeds 42, 43); dpo (seed 43); raft (seeds 42, 43)"
    ) in table
