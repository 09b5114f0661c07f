"""The non-weight files of OUT: tokenizer (the adapter's wins), generation config, model card, config."""

import json

import pytest

import lorafuse
from conftest import make_adapter, read_config


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(60)])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def base_with_tokenizer(tiny_base, tmp_path_factory):
    import shutil

    from transformers import GenerationConfig

    folder = tmp_path_factory.mktemp("tok-base") / "base"
    shutil.copytree(tiny_base("llama", "bf16"), folder)
    _tokenizer().save_pretrained(folder)
    GenerationConfig(max_new_tokens=7, do_sample=False).save_pretrained(folder)
    (folder / "LICENSE").write_text("license text")
    return folder


def test_adapter_tokenizer_wins_and_other_files_are_carried(base_with_tokenizer, tmp_path):
    from peft import LoraConfig
    from transformers import AutoTokenizer, GenerationConfig

    adapter = make_adapter(base_with_tokenizer, tmp_path / "adapter",
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False))
    trained = _tokenizer()
    trained.add_special_tokens({"additional_special_tokens": ["<tool>"]})  # as a fine-tune that adds tokens
    trained.save_pretrained(adapter)
    lorafuse.merge(base_with_tokenizer, adapter, tmp_path / "out")
    out = tmp_path / "out"
    assert "<tool>" in AutoTokenizer.from_pretrained(out).get_vocab()
    assert GenerationConfig.from_pretrained(out).max_new_tokens == 7
    assert (out / "LICENSE").read_text() == "license text"
    assert not (out / "adapter_config.json").exists() and not (out / "adapter_model.safetensors").exists()


def test_model_card_and_config(base_with_tokenizer, tmp_path):
    from huggingface_hub import ModelCard
    from peft import LoraConfig

    adapter = make_adapter(base_with_tokenizer, tmp_path / "adapter",
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False, use_rslora=True))
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someorg/tiny-llama"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    lorafuse.merge(base_with_tokenizer, adapter, tmp_path / "out", dtype="fp32")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model == "someorg/tiny-llama" and "lorafuse" in card.data.tags
    assert "rsLoRA | True" in card.text and "output dtype | F32" in card.text
    out_config = read_config(tmp_path / "out")
    assert out_config["dtype"] == "float32"
    assert {k: v for k, v in out_config.items() if k != "dtype"} == {
        k: v for k, v in read_config(base_with_tokenizer).items() if k != "dtype"}
