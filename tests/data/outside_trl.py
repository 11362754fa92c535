"""A user's own training script: TRL's SFTTrainer and KTOTrainer on what `prefloop
export --kind sft|kto --format jsonl` wrote, with nothing from prefloop.

usage: outside_trl.py MODEL SFT_DIR KTO_DIR OUT_DIR; prints one JSON line."""

import json
import sys

from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import KTOConfig, KTOTrainer, SFTConfig, SFTTrainer

model_dir, sft_dir, kto_dir, out_dir = sys.argv[1:5]
common = {
    "per_device_train_batch_size": 2,
    "max_steps": 2,
    "max_length": 128,
    "use_cpu": True,
    "report_to": [],
    "save_strategy": "no",
    "disable_tqdm": True,
}
tokenizer = AutoTokenizer.from_pretrained(model_dir)

sft_data = load_dataset(sft_dir)  # train.jsonl / test.jsonl: the splits
sft = SFTTrainer(
    model=AutoModelForCausalLM.from_pretrained(model_dir),
    args=SFTConfig(output_dir=f"{out_dir}/sft", **common),
    train_dataset=sft_data["train"],
    processing_class=tokenizer,
)
sft.train()

kto_data = load_dataset(kto_dir)
kto = KTOTrainer(
    model=AutoModelForCausalLM.from_pretrained(model_dir),
    args=KTOConfig(output_dir=f"{out_dir}/kto", **common),
    train_dataset=kto_data["train"],
    processing_class=tokenizer,
)
kto.train()

ours = sorted(m for m in sys.modules if m.split(".")[0] in ("pipeline", "flows"))
print(
    json.dumps(
        {
            "sft_steps": sft.state.global_step,
            "kto_steps": kto.state.global_step,
            "prefloop_modules": ours,
        }
    )
)
