"""python -m unsloth_jax.train [--config FILE] [--model M] [--dataset F] [--output DIR] [--<key> VALUE ...]

With no arguments it runs configs/demo.yaml: a tiny model fine-tuned on the shipped demo data,
evaluated, exported as a PEFT adapter, and asked for a sample reply.
"""
from __future__ import annotations

import logging
import os
import sys

from unsloth_jax.errors import UnslothJaxError
from unsloth_jax.train.config import DEMO_CONFIG, REPO_CONFIGS, help_text, load_config

USAGE = __doc__ + "\nOptions (YAML config keys; any of them can be given as --key value):\n"


def parse_args(argv: list[str]):
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + "  --config FILE                      YAML file with any of the keys below\n" + help_text())
        sys.exit(0)
    config, overrides, i = None, {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise UnslothJaxError(f"argument {arg!r}: expected --key value (see --help).")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                value = "true"  # a bare flag: --load-in-4bit
            else:
                i += 1
                value = argv[i]
        if key == "config":
            config = value
        else:
            overrides[key.replace("-", "_")] = value
        i += 1
    if config is None and not overrides:
        config = DEMO_CONFIG
    return config, overrides


def resolve_path(path):
    """Paths as given, else relative to the repository (so configs/demo.yaml works from anywhere)."""
    if path is None or os.path.exists(path):
        return path
    candidate = os.path.join(os.path.dirname(REPO_CONFIGS), path)
    return candidate if os.path.exists(candidate) else path


def main(argv=None) -> dict:
    from unsloth_jax import FastLanguageModel
    from unsloth_jax.train.loop import SFTTrainer

    config_path, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = load_config(resolve_path(config_path), overrides)
    cfg.dataset, cfg.eval_dataset = resolve_path(cfg.dataset), resolve_path(cfg.eval_dataset)
    model_path = cfg.model
    if model_path.startswith("demo:"):
        from unsloth_jax.demo import build_demo_model

        model_path = build_demo_model(os.path.join(cfg.output_dir, "demo_model"))
    model, tokenizer = FastLanguageModel.from_pretrained(model_path, max_seq_length=cfg.max_seq_length,
                                                         dtype=cfg.dtype, load_in_4bit=cfg.load_in_4bit,
                                                         full_finetuning=cfg.full_finetuning)
    model = FastLanguageModel.get_peft_model(
        model, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules, use_rslora=cfg.use_rslora, modules_to_save=cfg.modules_to_save,
        use_gradient_checkpointing=cfg.gradient_checkpointing, random_state=cfg.seed)
    trainer = SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=cfg.dataset,
                         eval_dataset=cfg.eval_dataset, args=cfg)
    result = trainer.train()  # ends by writing the PEFT adapter to <output_dir>/adapter
    if cfg.save_merged:
        merged = os.path.join(cfg.output_dir, "merged")
        model.save_pretrained_merged(merged, tokenizer, save_method="merged_16bit")
        print(f"Merged 16-bit model written to {merged}")
    if cfg.sample_prompt:
        result["sample"] = sample_reply(model, tokenizer, cfg)
    return result


def sample_reply(model, tokenizer, cfg) -> str:
    import numpy as np

    from unsloth_jax import FastLanguageModel

    FastLanguageModel.for_inference(model)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": cfg.sample_prompt}],
                                           add_generation_prompt=True, tokenize=False)
    ids = np.asarray([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    out = model.generate(ids, max_new_tokens=cfg.max_new_tokens, temperature=0.0,
                         eos_token_id=tokenizer.eos_token_id)
    reply = tokenizer.decode(np.asarray(out)[0, ids.shape[1]:], skip_special_tokens=True)
    print(f"Sample\n  user: {cfg.sample_prompt}\n  model: {reply}")
    return reply


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        main()
    except UnslothJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
