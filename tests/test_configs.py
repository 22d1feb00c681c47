"""Every preset is a valid config, names a model of its family, and is what the generator writes."""
import glob
import importlib.util
import os

import pytest

from unsloth_jax.train.config import load_config

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
PRESETS = sorted(p for p in glob.glob(os.path.join(CONFIGS, "*.yaml")) if not p.endswith("demo.yaml"))


def generator():
    spec = importlib.util.spec_from_file_location("make_presets", os.path.join(CONFIGS, "make_presets.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_there_is_a_lora_and_qlora_preset_per_model():
    names = {os.path.basename(p) for p in PRESETS}
    for model in generator().MODELS:
        assert {f"{model}-lora.yaml", f"{model}-qlora.yaml"} <= names


@pytest.mark.parametrize("path", PRESETS + [os.path.join(CONFIGS, "demo.yaml")], ids=os.path.basename)
def test_preset_is_a_valid_config(path):
    cfg = load_config(path, {})
    name = os.path.basename(path)
    assert cfg.load_in_4bit == name.endswith("-qlora.yaml")
    if name != "demo.yaml":
        family = name.split("-")[0].replace(".", "")  # llama, mistral, qwen25, qwen3, gemma
        assert family[:4] in cfg.model.lower().replace(".", "").replace("-", ""), (name, cfg.model)


def test_presets_are_what_the_generator_writes(tmp_path):
    generator().main(str(tmp_path))
    for path in PRESETS + [os.path.join(CONFIGS, "README.md")]:
        with open(path) as f, open(tmp_path / os.path.basename(path)) as g:
            assert f.read() == g.read(), f"{path} is stale: run python configs/make_presets.py"


def test_tier_estimates_grow_with_batch_and_fall_with_quantization():
    gen = generator()
    shape = gen.MODELS["llama-3.1-8b"][2]
    assert gen.estimate_gib(shape, True, 2, 2048) < gen.estimate_gib(shape, False, 2, 2048)
    assert gen.estimate_gib(shape, False, 4, 2048) > gen.estimate_gib(shape, False, 2, 2048)
