"""The Hugging Face Trainer adapter, with a real ``transformers.Trainer`` on a tiny GPT-2."""

import json
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from helpers.hf import datasets, mean_loss, tiny_gpt2, trainer  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM, EarlyStoppingCallback, TrainerCallback  # noqa: E402

from ckptavg.hf import CheckpointAveragerCallback  # noqa: E402


def _logged(run, key):
    return {entry["step"]: entry[key] for entry in run.state.log_history if key in entry}


def test_merged_metrics_are_logged_and_equal_an_independent_evaluation_of_the_merge(tmp_path):
    averager = CheckpointAveragerCallback(window=4, every_n_steps=5, storage="cpu")
    run = trainer(tmp_path, [averager])
    run.train()
    merged = _logged(run, "eval_merged_loss")
    raw = _logged(run, "eval_loss")
    assert sorted(merged) == sorted(raw) == [20, 40]
    assert averager.window.steps == [25, 30, 35, 40]
    # The model now holds the merge of the last window: the step-40 preview measured these weights.
    _, val = datasets()
    assert merged[40] == pytest.approx(mean_loss(run.model, val), rel=1e-6)
    expected = averager.window.merge("sma")
    for name, tensor in run.model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert averager.final_metrics["merged"]["eval_loss"] == pytest.approx(merged[40], rel=1e-6)


def test_the_preview_leaves_the_run_exactly_as_it_was(tmp_path):
    """Raw weights, optimizer, RNG and the logged raw numbers: identical with and without previews."""

    def run(folder, preview):
        averager = CheckpointAveragerCallback(
            window=4, every_n_steps=5, storage="cpu", preview=preview, merge_at_end=False, recover=False
        )
        t = trainer(folder, [averager], eval_steps=10)
        t.train()
        return t, averager

    with_preview, _ = run(tmp_path / "a", True)
    without, _ = run(tmp_path / "b", False)
    assert _logged(with_preview, "eval_loss") == _logged(without, "eval_loss")
    assert _logged(with_preview, "loss") == _logged(without, "loss")
    for (name, a), b in zip(with_preview.model.state_dict().items(), without.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert "eval_merged_loss" not in str(without.state.log_history)


def test_early_stopping_and_the_best_model_read_the_merged_metric(tmp_path):
    averager = CheckpointAveragerCallback(window=4, every_n_steps=5)
    stop = EarlyStoppingCallback(early_stopping_patience=1, early_stopping_threshold=100.0)
    run = trainer(
        tmp_path,
        [stop, averager],
        max_steps=200,
        eval_steps=10,
        save_strategy="steps",
        save_steps=10,
        load_best_model_at_end=True,
        metric_for_best_model="merged_loss",
    )
    run.train()
    merged = _logged(run, "eval_merged_loss")
    # No improvement of 100 nats: the second evaluation stops the run.
    assert run.state.global_step == 20 and sorted(merged) == [10, 20]
    assert run.state.best_metric == min(merged.values())
    best = min(merged, key=merged.get)
    assert run.state.best_model_checkpoint.endswith(f"checkpoint-{best}")
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    # The best checkpoint holds the merge that earned the score, and the model ends holding it.
    assert run.evaluate()["eval_loss"] == pytest.approx(merged[best], rel=1e-6)
    assert (tmp_path / f"checkpoint-{best}" / "ckptavg_raw.safetensors").is_file()


class Poison(TrainerCallback):
    """Make one optimizer step's weights NaN (a bad batch): its loss and the weights after it are NaN."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            with torch.no_grad():
                model.transformer.wte.weight[0, 0] = float("nan")


def test_a_nan_step_is_restored_and_training_goes_on(tmp_path):
    averager = CheckpointAveragerCallback(window=4, every_n_steps=5, storage="cpu")
    run = trainer(tmp_path, [averager, Poison(27)], max_steps=40, eval_steps=40)
    with pytest.warns(UserWarning, match="non-finite loss and weights at step 27"):
        run.train()
    assert [event.step for event in averager.recovery_events if event.action == "restored"] == [27]
    assert all(torch.isfinite(t).all() for t in run.model.state_dict().values())
    assert math.isfinite(_logged(run, "eval_merged_loss")[40])


def test_the_merged_folder_loads_with_from_pretrained_and_gives_the_same_logits(tmp_path):
    averager = CheckpointAveragerCallback(window=3, every_n_steps=10)
    run = trainer(tmp_path, [averager], max_steps=30, eval_steps=30)
    run.train()
    folder = tmp_path / "merged"
    assert averager.merged_path == folder and (folder / "config.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    ids = datasets()[1].ids[:4]
    run.model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, run.model(input_ids=ids).logits)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()  # still tied
    with safe_open(folder / "model.safetensors", "pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "pt" and metadata["ckptavg"] == "merged" and metadata["method"] == "sma"
    assert json.loads(metadata["steps"]) == [10, 20, 30]
    assert json.loads(metadata["coefficients"]) == pytest.approx([1 / 3] * 3)


@pytest.mark.parametrize("storage, metric", [("cpu", None), ("disk", "merged_loss")])
def test_a_resumed_run_ends_bit_identical_to_an_uninterrupted_one(tmp_path, storage, metric):
    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 20:
                control.should_training_stop = True

    def averager():
        return CheckpointAveragerCallback(window=4, every_n_steps=5, storage=storage, recover=False)

    saving = dict(save_strategy="steps", save_steps=20, eval_steps=20, metric_for_best_model=metric)
    whole = trainer(tmp_path / "whole", [averager()], **saving)
    whole.train()
    first = trainer(tmp_path / "split", [averager(), StopAt()], **saving)
    first.train()
    assert (tmp_path / "split" / "checkpoint-20" / "ckptavg_state.pt").is_file()
    assert (tmp_path / "split" / "checkpoint-20" / "ckptavg_raw.safetensors").is_file() == (metric is not None)
    resumed_averager = averager()
    second = trainer(tmp_path / "split", [resumed_averager], model=tiny_gpt2(seed=1), **saving)
    second.train(resume_from_checkpoint=str(tmp_path / "split" / "checkpoint-20"))
    assert resumed_averager.window.steps == [25, 30, 35, 40]
    for (name, a), b in zip(whole.model.state_dict().items(), second.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_bad_arguments_are_the_averagers_errors():
    with pytest.raises(ValueError, match="window must be a positive integer"):
        CheckpointAveragerCallback(window=0)
    with pytest.raises(ValueError, match="unknown merge method"):
        CheckpointAveragerCallback(merge="nope")
    with pytest.raises(ValueError, match="give candidates"):
        CheckpointAveragerCallback(select="eval_loss")


def test_ddp_with_two_processes_spreads_the_window_and_ends_with_one_merge(tmp_path):
    from conftest import run_ranks

    ranks = run_ranks("workers/hf_ddp.py", tmp_path, torchrun=True)
    assert [r["world"] for r in ranks] == [2, 2]
    assert [r["sharding"] for r in ranks] == ["spread", "spread"]
    for r in ranks:
        assert r["steps"] == [5, 10, 15, 20]
        assert r["stored"] < 0.6 * 5 * r["model_bytes"]  # half of every snapshot (and the spare row) per rank
        assert len(r["merged_losses"]) == 2
    for name, tensor in ranks[0]["state"].items():
        assert torch.equal(tensor, ranks[1]["state"][name]), name
    assert (tmp_path / "run" / "merged" / "model.safetensors").is_file()


def test_recovery_watches_the_loss_the_trainer_logs_under_gradient_accumulation(tmp_path):
    averager = CheckpointAveragerCallback(window=4, every_n_steps=5, storage="cpu")
    seen = {}

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen[state.global_step] = averager.guard.last_loss  # runs after the averager's on_step_end

    run = trainer(
        tmp_path, [averager, Watch()], max_steps=12, gradient_accumulation_steps=2, logging_steps=1, eval_steps=12
    )
    run.train()
    logged = _logged(run, "loss")
    assert sorted(seen) == list(range(1, 13))
    for step, loss in logged.items():
        assert seen[step] == pytest.approx(loss, rel=1e-5)


def test_a_compiled_model_is_snapshotted_and_exported_under_its_own_names(tmp_path):
    averager = CheckpointAveragerCallback(window=2, every_n_steps=5, storage="cpu")
    run = trainer(tmp_path, [averager], max_steps=10, eval_steps=10, torch_compile=True, torch_compile_backend="eager")
    run.train()
    assert averager.window.steps == [5, 10]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    expected = averager.window.merge("sma")
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_bf16_autocast_on_the_cpu_runs_and_ends_with_a_finite_merge(tmp_path):
    averager = CheckpointAveragerCallback(window=2, every_n_steps=5)
    run = trainer(tmp_path, [averager], max_steps=10, eval_steps=10, bf16=True)
    run.train()
    assert averager.window.steps == [5, 10]
    assert math.isfinite(_logged(run, "eval_merged_loss")[10])
    assert all(torch.isfinite(t).all() for t in run.model.state_dict().values())


def test_a_peft_lora_model_ends_with_the_merged_adapter(tmp_path):
    peft = pytest.importorskip("peft")

    model = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=4, target_modules=["c_attn"], lora_dropout=0.0))
    averager = CheckpointAveragerCallback(window=2, every_n_steps=5)
    run = trainer(tmp_path, [averager], model=model, max_steps=10, eval_steps=10)
    run.train()
    assert (tmp_path / "merged" / "adapter_model.safetensors").is_file()  # save_pretrained of a PEFT model: the adapter
    reloaded = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "merged")
    ids = datasets()[1].ids[:2]
    model.eval(), reloaded.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)


def test_checkpoint_rotation_never_touches_the_disk_window(tmp_path):
    averager = CheckpointAveragerCallback(window=3, every_n_steps=5, storage="disk", recover=False)
    run = trainer(
        tmp_path, [averager], max_steps=30, save_strategy="steps", save_steps=10, save_total_limit=1, eval_steps=30
    )
    run.train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-30"]
    files = sorted(p.name for p in (tmp_path / "ckptavg" / "window").glob("*.safetensors"))
    assert len(files) == 3 and averager.window.steps == [20, 25, 30]
    assert averager.window.verify() == []


def test_a_callback_added_after_the_trainer_was_built_resumes_too(tmp_path):
    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 20:
                control.should_training_stop = True

    def averager():
        return CheckpointAveragerCallback(window=4, every_n_steps=5, storage="cpu", recover=False)

    saving = dict(save_strategy="steps", save_steps=20, eval_steps=20)
    whole = trainer(tmp_path / "whole", [averager()], **saving)
    whole.train()
    trainer(tmp_path / "split", [averager(), StopAt()], **saving).train()
    late = averager()
    second = trainer(tmp_path / "split", [], model=tiny_gpt2(seed=1), **saving)
    second.add_callback(late)
    second.train(resume_from_checkpoint=str(tmp_path / "split" / "checkpoint-20"))
    assert late.window.steps == [25, 30, 35, 40]
    for (name, a), b in zip(whole.model.state_dict().items(), second.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_previews_every_other_evaluation_on_the_first_batches_and_say_what_they_cost(tmp_path):
    averager = CheckpointAveragerCallback(window=4, every_n_steps=5, storage="cpu", preview_every=2, preview_batches=1)
    _, val = datasets()
    first = type(val).__new__(type(val))
    first.ids = val.ids[:16]  # one evaluation batch (per_device_eval_batch_size=16)
    checked = {}

    class Probe(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
            if "eval_merged_loss" in metrics:
                merged = averager.window.merged_model(model)
                checked[state.global_step] = (metrics["eval_merged_loss"], mean_loss(merged, first))

    run = trainer(tmp_path, [averager, Probe()], eval_steps=10)
    with _infos() as infos:
        run.train()
    assert sorted(_logged(run, "eval_loss")) == [10, 20, 30, 40]  # the raw metrics: every evaluation, every batch
    assert sorted(_logged(run, "eval_merged_loss")) == sorted(checked) == [10, 30]
    for logged, reference in checked.values():
        assert logged == pytest.approx(reference, rel=1e-6)
    assert any("every 2 validations also runs 1 validation(s) on its first 1 batch(es)" in m for m in infos)


def test_judging_by_merged_metrics_needs_a_preview_at_every_evaluation(tmp_path):
    averager = CheckpointAveragerCallback(window=4, every_n_steps=5, storage="cpu", preview_every=3)
    run = trainer(
        tmp_path,
        [averager, EarlyStoppingCallback(2)],
        metric_for_best_model="merged_loss",
        load_best_model_at_end=True,
        save_strategy="steps",
        save_steps=20,
    )
    with pytest.raises(
        ValueError, match=r"preview_every=3.*metric_for_best_model='merged_loss', EarlyStoppingCallback"
    ):
        run.train()


def _infos():
    import contextlib
    import logging

    @contextlib.contextmanager
    def capture():
        messages = []
        handler = logging.Handler()
        handler.emit = lambda record: messages.append(record.getMessage())
        logger = logging.getLogger("ckptavg")
        level = logger.level
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            yield messages
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)

    return capture()
