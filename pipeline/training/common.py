"""What the training jobs share (runs inside the training child process)."""

import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from pipeline.training.export import read_dataset


def load_splits(data_dir: str):
    """The step's snapshot (parquet, so its columns come with it): train and test (None
    when nothing is held out)."""
    data = read_dataset(Path(data_dir), columns=None)
    train, test = data["train"], data.get("test")
    if len(train) == 0:
        raise ValueError(f"{data_dir}: no training rows (check the round's filters)")
    return train, (test if test is not None and len(test) > 0 else None)


def load_policy(path: str, cuda: bool):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16 if cuda else torch.float32
    )


def trainer_args(spec, out: Path) -> dict[str, Any]:
    """TrainingArguments shared by every kind's TRL config. The trainer's logs for
    `report_to` (tensorboard's event files, wandb's run folder) go in the checkpoint's logs/
    unless the environment says where."""
    t = spec["training"]
    cuda = spec["device"] == "cuda"
    for variable in ("TENSORBOARD_LOGGING_DIR", "WANDB_DIR"):
        os.environ.setdefault(variable, str(out / "logs"))
    return {
        "output_dir": str(out / "trainer"),
        "learning_rate": t["learning_rate"],
        "num_train_epochs": t["epochs"],
        "per_device_train_batch_size": t["batch_size"],
        "per_device_eval_batch_size": t["batch_size"],
        "gradient_accumulation_steps": t["gradient_accumulation_steps"],
        "max_length": t["max_length"],
        "seed": spec["seed"],
        "use_cpu": not cuda,
        "bf16": cuda,
        "logging_steps": 1,
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": t.get("report_to") or [],
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }


def lora_config(spec, task_type: str):
    lora = spec["training"].get("lora")
    if not lora:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"],
        task_type=task_type,
    )


def save(trainer, tokenizer, base_model: str, out: Path, metrics: dict[str, Any]) -> None:
    """The final model (LoRA merged into the weights) with the base's tokenizer, chat
    template and generation config: a plain checkpoint every engine loads."""
    model = trainer.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    trainer.accelerator.wait_for_everyone()
    if not trainer.accelerator.is_main_process:
        return
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    for name in ("generation_config.json", "chat_template.jinja"):
        src = Path(base_model) / name
        if src.is_file() and not (out / name).is_file():
            shutil.copy(src, out / name)
    shutil.rmtree(out / "trainer", ignore_errors=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))


class Progress(TrainerCallback):
    """Writes the step's progress where its spec says (`progress_file`), replaced whole
    each time: the phase, trainer step i of n, the latest loss, when training began.
    The parent's console and `prefloop status` read it; only the main process writes."""

    def __init__(self, path: str, main_process: bool = True) -> None:
        self.path = Path(path) if path and main_process else None
        self.record: dict[str, Any] = {}

    def update(self, **fields: Any) -> None:
        if self.path is None:
            return
        self.record.update(fields, updated=time.time())
        partial = self.path.with_name(self.path.name + f".{os.getpid()}")
        partial.write_text(json.dumps(self.record))
        os.replace(partial, self.path)

    def on_train_begin(self, args, state, control, **kwargs):
        self.update(phase="training", step=0, steps=state.max_steps, train_started=time.time())

    def on_step_end(self, args, state, control, **kwargs):
        self.update(step=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.update(step=state.global_step, loss=logs["loss"])


def last_loss(trainer) -> float | None:
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses[-1] if losses else None


def fit(trainer) -> dict[str, Any]:
    """Train; the metrics every trainer reports about the run itself."""
    start = time.perf_counter()
    result = trainer.train()
    return {
        "train_loss": result.training_loss,
        "final_step_loss": last_loss(trainer),
        "steps": trainer.state.global_step,
        "train_seconds": round(time.perf_counter() - start, 2),
    }


def run_trainer(
    trainer,
    spec: dict[str, Any],
    out: Path,
    tokenizer,
    eval_keys: Mapping[str, str],
    metrics: dict[str, Any],
    before: bool = True,
    after: Callable[[], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """What every kind does with its TRL trainer: held-out numbers before training (as
    `<name>_before`, where `before`), train, held-out numbers after (`eval_keys`: TRL's
    eval key -> prefloop's name; `after` adds the kind's own), save. Returns `metrics`."""
    progress = Progress(spec.get("progress_file", ""), trainer.accelerator.is_main_process)
    trainer.add_callback(progress)
    held_out = trainer.eval_dataset is not None
    if held_out and before:
        progress.update(phase="held-out numbers before training")
        found = trainer.evaluate()
        metrics.update({f"{name}_before": found.get(key) for key, name in eval_keys.items()})
    metrics.update(fit(trainer))
    if held_out:
        progress.update(phase="held-out numbers after training")
        found = trainer.evaluate()
        metrics.update({name: found.get(key) for key, name in eval_keys.items()})
        if after is not None:
            metrics.update(after())
    progress.update(phase="saving the model")
    save(trainer, tokenizer, spec["base_model"], out, metrics)
    return metrics
